"""ZeRO-3 partitioned loading (`rayalign.engine.partitioned_loading`), in two gloo processes on the CPU.

Each rank loads the tiny model inside the context, as a Ray Train worker does: every parameter is created
already partitioned, so a rank holds about half of the elements, never the whole model; gathered back
(`GatheredParameters`), the weights equal the checkpoint's. Then the engine's consolidated state dict,
gathered in memory on rank 0 (no second DeepSpeed checkpoint on disk), equals them too.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, out_dir: str, backend: str = "gloo") -> None:
    """One rank (`backend` nccl: on GPU `rank`, as tests/test_gpu_stack.py runs it) writes what it held."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    import deepspeed

    from rayalign.config_loader import load_config
    from rayalign.engine import DeepSpeedEngine, partitioned_loading
    from rayalign.models import load_model

    config = load_config(None, [f"model.policy={model_dir}", "train.engine=deepspeed", "train.zero_stage=3",
                                f"train.num_workers={world}", "train.global_batch_size=2",
                                f"train.use_gpu={backend == 'nccl'}"])
    with partitioned_loading(config):
        model = load_model(model_dir)
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    held = sum(p.numel() for p in model.parameters())  # what the rank materialised outside a gather
    reference = load_model(model_dir).state_dict()
    equal = True
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            equal &= torch.equal(param.detach().cpu(), reference[name])
    engine = DeepSpeedEngine(model, config, total_steps=1)
    consolidated = engine.full_state_dict(None)
    same_export = None if consolidated is None else all(
        torch.equal(consolidated[k].cpu(), reference[k]) for k in reference if k in consolidated)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"local": local, "total": total, "held": held, "equal": bool(equal),
                   "export_equal": same_export}, f)
    torch.distributed.destroy_process_group()


def run_ranks(model_dir, out_dir, backend: str = "gloo") -> list[dict]:
    """Two ranks load the model partitioned; what each held (`_rank_main`)."""
    mp.spawn(_rank_main, args=(2, _free_port(), str(model_dir), str(out_dir), backend), nprocs=2, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def assert_each_rank_held_its_shard(ranks: list[dict]) -> None:
    total = ranks[0]["total"]
    assert total > 0 and all(r["total"] == total for r in ranks)
    for r in ranks:
        assert r["held"] == 0, r  # outside a gather a rank holds no full parameter
        assert r["local"] <= total / 2 + 1024, r  # its shard: half, up to per-parameter padding
        assert r["equal"], r
    assert ranks[0]["export_equal"] is True and ranks[1]["export_equal"] is None


def test_zero3_ranks_load_only_their_shard(tiny_model_dir, tmp_path):
    assert_each_rank_held_its_shard(run_ranks(tiny_model_dir, tmp_path))
