"""configs/gpu/*.yaml: valid configs whose stages fit the GPUs they are written for.

Loading checks every key and value (the checks `rayalign run` makes before Ray starts, but the hub ids, which
need the network). Then the placement arithmetic: the generator and the judge run in one Ray Data pass, so
their GPUs add up; the reference scorers and the training workers each run beside whatever the persistent
generators and judges hold for the run (the one-GPU config: a quarter each, offloading between passes). The
8-GPU config asks for cluster.yaml's 8-GPU node type in every stage.
"""

from pathlib import Path

import pytest
import yaml

from rayalign.config_loader import load_config

REPO = Path(__file__).resolve().parents[1]
NODE_GPUS = {"qwen0.5b_ultrafeedback_spa.yaml": 1, "llama8b_ultrafeedback_spa.yaml": 8}


def test_every_gpu_config_is_listed():
    assert {p.name for p in (REPO / "configs" / "gpu").glob("*.yaml")} == set(NODE_GPUS)


@pytest.mark.parametrize("name", sorted(NODE_GPUS))
def test_gpu_config_loads_and_its_stages_fit_the_node(name):
    config = load_config(REPO / "configs" / "gpu" / name)
    gpus = NODE_GPUS[name]
    assert config.train.use_gpu and config.train.precision == "bf16" and config.loop.task == "none"
    assert config.generate.backend == "vllm" and config.spa.refine
    generate, judge, train = config.generate, config.judge, config.train
    together = generate.num_actors * generate.gpus_per_actor + judge.num_actors * judge.gpus_per_actor
    assert 0 < together <= gpus
    # persistent hosts keep their Ray share for the run, beside each later stage; on a GPU they must free its
    # memory between passes (their share is not the memory they take)
    held = (generate.persistent * generate.num_actors * generate.gpus_per_actor
            + judge.persistent * judge.num_actors * judge.gpus_per_actor)
    assert generate.offload_between_passes == generate.persistent and judge.offload_between_passes == judge.persistent
    assert held + config.ref.num_actors * config.ref.gpus_per_actor <= gpus
    assert held + train.num_workers * train.gpus_per_worker <= gpus
    if gpus == 8:
        label = next(iter(yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
                          ["ray.worker.gpu8"]["resources"].keys() - {"GPU"}))
        for placed in (config.generate.resources, config.judge.resources, config.ref.resources,
                       config.train.resources_per_worker):
            assert label in placed
        assert config.train.engine == "deepspeed" and config.train.zero_stage == 3
        assert generate.tensor_parallel_size == generate.gpus_per_actor == 2  # vLLM tensor parallel
        # the README's LoRA option and its one-machine command (no cluster labels) load too
        lora = load_config(REPO / "configs" / "gpu" / name, ["model.lora=true", "train.zero_stage=2"])
        assert lora.model.lora and lora.train.zero_stage == 2
        local = load_config(REPO / "configs" / "gpu" / name, ["generate.resources={}", "judge.resources={}",
                                                              "ref.resources={}", "train.resources_per_worker={}"])
        assert not (local.generate.resources or local.judge.resources or local.ref.resources
                    or local.train.resources_per_worker)
