"""The Ray Train worker function: `train_fn_per_worker(loop_config)`, run by every training worker.

Each worker reads the prepared Parquet (token ids + cached reference columns), walks the same seeded
sequence of global batches as `rayalign.oracle` (both from `rayalign.data_order`), takes its own
`gradient_accumulation_steps` micro-batches of each, and steps the engine (DDP or DeepSpeed). Metrics are
summed across workers; rank 0 writes them. On start it continues from the newest complete checkpoint in
the run directory, which covers both `--resume` and Ray Train restarting the group after a worker died.
With `model.lora` the policy is the stage's model plus adapters (`rayalign.lora`): checkpoints hold the
adapters, `final/` the merged model.

No data loading from raw files and no Ray Data here: that happened on the driver (`rayalign.train`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from rayalign import checkpoint as ckpt
from rayalign import storage_train
from rayalign.config import Config
from rayalign.config_loader import build_config
from rayalign.data_kind import LEVEL_KINDS
from rayalign.data_order import micro_batch_bounds, micro_batches, step_batches, total_steps
from rayalign.encode import collate_with_reference, encoded_rows
from rayalign.engine import build_engine, partitioned_loading
from rayalign.fault_drills import inject_fault
from rayalign.group_batching import group_reference_column
from rayalign.io import atomic_directory, atomic_write_text
from rayalign.metrics_log import MetricsLog
from rayalign.models import save_weights
from rayalign.objective import mallows_scale, metrics_from_sums, needs_dispersion, pair_metric_sums, unit_dispersion
from rayalign.sams_select import PairSelector, pair_margins
from rayalign.spa_refine import SpaRefiner
from rayalign.stage_inputs import StageInputs
from rayalign.stage_timing import WORKER_FILE
from rayalign.step import ENTROPY_KEYS, GAP_METRIC, REF_KEYS, belief_gap_sums, micro_batch_loss
from rayalign.storage import materialize
from rayalign.tracking import TrackingSettings

FAILURE_FILE = "FAILED.json"


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _read_prepared(path: str, kind: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    frame = pd.read_parquet(path)
    encoded = encoded_rows(frame, kind)
    columns = {k: torch.tensor(frame[k].to_numpy()) for k in (*REF_KEYS, *ENTROPY_KEYS) if k in frame}
    columns.update(group_reference_column(frame))  # K-sample groups: ref_logps (N, K)
    return encoded, columns


def worker_chunks(indices: list[int], *, splits: int, rank: int, per_worker: int) -> list[list[int]]:
    """This worker's micro-batches of one global batch: the same contiguous split as the oracle."""
    return micro_batches(indices, splits)[rank * per_worker:(rank + 1) * per_worker]


class Worker:
    """State of one training worker; `run()` is the whole loop."""

    def __init__(self, loop_config: dict):
        self.created = time.perf_counter()  # the worker's start-up: `run` reports it (`rayalign.stage_timing`)
        import ray.train

        from rayalign.models import LoadOptions, load_tokenizer

        self.inputs = StageInputs(**loop_config["inputs"])  # this stage's run state (epochs, SPA mix, loss)
        self.config: Config = build_config(loop_config["config"])  # the driver's `inputs.stage_config(...)`
        self.paths = loop_config
        self.run_dir = Path(self.config.run.dir)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.node_leader = storage_train.first_rank_on_node(self.rank)  # writes and uploads its node's files
        # run.storage: inputs are storage locations (`materialize`: this node's copy; a local path stays);
        # outputs go to a node-local scratch run dir that rank 0 publishes
        self.store = storage_train.worker_storage(loop_config, rank=self.rank)
        if self.store:
            self.run_dir = self.store.local_root
        torch.manual_seed(self.config.train.seed)
        self._read_data(loop_config)
        self.total = total_steps(len(self.encoded), self.config.train, self.inputs.epochs)
        self.steps_per_epoch = math.ceil(len(self.encoded) / self.config.train.global_batch_size)
        self.resume_from = (storage_train.resume_checkpoint(self.store) if self.store
                            else ckpt.latest_checkpoint(self.run_dir))
        self.start_step = ckpt.read_state(self.resume_from)["step"] if self.resume_from else 0
        self.device = torch.device("cpu")
        if self.config.train.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        self.load = LoadOptions.of(self.config.model)
        self.tokenizer = load_tokenizer(materialize(loop_config["tokenizer_path"]), self.load)
        self.lora = self.config.model.lora
        self.policy = self._load_policy(loop_config["policy_path"])
        refine = self.inputs.spa_mix is not None
        self.reference = self._load_reference(loop_config) if refine or not self.columns else None
        self.engine = build_engine(self.policy, self.config, self.total)
        self.refiner = (SpaRefiner(self.config.spa, mix=self.inputs.spa_mix, beta_total_steps=self.total) if refine
                        else None)
        self.selector = None
        if self.config.sams.enabled:
            model_config = self.policy.config
            self.selector = PairSelector(self.config, num_layers=model_config.num_hidden_layers,
                                         hidden_size=model_config.hidden_size, total_steps=self.total, rank=self.rank)
        self._restore()
        self.log = MetricsLog(self.run_dir, enabled=self.rank == 0, total_steps=self.total,
                              resume_step=self.start_step, config=loop_config["config"],
                              tracking=TrackingSettings.from_dict(loop_config.get("tracking")))

    def _read_data(self, loop_config: dict) -> None:
        """The prepared pairs (token ids, reference columns) and, for MallowsPO, the dispersion scale c."""
        self.kind = loop_config["data_kind"]  # decided once by the driver (`rayalign.data_kind.decide`)
        self.encoded, self.columns = _read_prepared(materialize(loop_config["train_path"]), self.kind)
        self.eval = (_read_prepared(materialize(loop_config["eval_path"]), self.kind) if loop_config.get("eval_path")
                     else None)
        self.k = self.mallows_c = None
        if needs_dispersion(self.config.loss):  # c is fixed from the training pairs, eval included
            unit = unit_dispersion(self.columns)
            self.mallows_c = mallows_scale(self.config.loss, unit)
            self.k = unit * self.mallows_c

    def _load_reference(self, loop_config: dict):
        """The reference model for steps that score it live (SPA's refinement, or no cached reference columns)."""
        if self.lora and loop_config["reference_path"] == loop_config["policy_path"]:
            from rayalign.lora import BaseReference

            return BaseReference(self.policy)  # the base weights, adapters disabled: no second copy
        from rayalign.models import load_model

        return load_model(materialize(loop_config["reference_path"]), self.load, dtype=self._reference_dtype(),
                          device=self.device)

    def _restore(self) -> None:
        """The newest checkpoint's engine, scheduler and SPA window; else SamS's state carried from the last stage."""
        if self.selector and self.inputs.sams_state and not self.resume_from:
            self.selector.load_carried(Path(materialize(self.inputs.sams_state)))
        if not self.resume_from:
            return
        self.engine.load(self.resume_from)
        if self.selector:
            self.selector.load(self.resume_from)
        if self.refiner:
            self.refiner.load_state_dict(ckpt.read_state(self.resume_from)["spa_window"])

    def _load_policy(self, policy_path: str):
        """The policy in train mode: the newest checkpoint's weights, or with LoRA the stage's policy as the
        base with fresh adapters or, on resume, the checkpoint's adapters (a LoRA checkpoint holds only those)."""
        from rayalign.models import load_model

        weights = str(self.resume_from) if self.resume_from and not self.lora else materialize(policy_path)
        # float32 whatever train.precision says: these are the master weights (bf16 is autocast or DeepSpeed's
        # bf16 mode), so that updates at lr ~5e-7 do not round away.
        with partitioned_loading(self.config):  # ZeRO-3: each rank loads its shard only
            policy = load_model(weights, self.load, dtype="float32", device=self.device)
        if self.config.train.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            if self.lora:  # frozen embeddings: let the checkpointed blocks' inputs carry the adapters' gradient
                policy.enable_input_require_grads()
        if self.lora:
            from rayalign.lora import add_adapters

            policy = add_adapters(policy, self.config.model, seed=self.config.train.seed, checkpoint=self.resume_from)
        return policy.train()

    def _reference_dtype(self) -> str:
        from rayalign.devices import inference_dtype

        return inference_dtype(self.config.ref.dtype, 1.0 if self.device.type == "cuda" else 0.0)

    def _autocast(self):
        from rayalign.devices import training_autocast

        return training_autocast(self.config.train, self.device.type)

    def _forward(self, chunk: list[int], refine=None, want_context: bool = False):
        # An empty chunk (a short last batch) still runs a forward (weighted 0 by the caller), so that every
        # worker joins the same gradient all-reduce (DDP) and parameter gathers (ZeRO-3).
        index = torch.tensor(chunk or [0])
        batch = self._to_device(collate_with_reference(self.encoded, self.columns, index, kind=self.kind,
                                                       pad_token_id=self.tokenizer.pad_token_id))
        k = None if self.k is None else self.k[index].to(self.device)
        with self._autocast():
            out = micro_batch_loss(self.engine.module, batch, self.config, reference=self.reference,
                                   neg_log_dispersion=k, refine=refine, want_context=want_context, kind=self.kind)
        if refine is not None and chunk:
            self.refiner.record(chunk, out.refine_margins)
        return out

    def _metric_sums(self, out, chunk: list[int]) -> torch.Tensor:
        sums = pair_metric_sums(out.losses.detach(), out.policy_chosen_logps, out.policy_rejected_logps,
                                out.ref_chosen_logps, out.ref_rejected_logps, beta=self.config.loss.beta)
        extra = torch.tensor([float(out.tokens * bool(chunk)), float(out.relabelled * bool(chunk))],
                             dtype=torch.float64, device=sums.device)
        return torch.cat([sums * bool(chunk), extra])

    def _micro_batch(self, chunk: list[int], global_size: int, refine=None) -> torch.Tensor:
        out = self._forward(chunk, refine)
        scale = (self.world / global_size) if chunk else 0.0
        self.engine.backward(out.losses.sum() * scale)
        return self._metric_sums(out, chunk)

    def _sams_batch(self, chunk: list[int], indices: list[int], refine=None) -> torch.Tensor:
        """SamS: forward this worker's pairs, let the selector choose K of the global batch, back-propagate
        the mean loss of the chosen ones (ALGORITHMS.md §6 step 4). Accumulation is 1 (config check)."""
        regrad = self.config.sams.regrad
        with torch.no_grad() if regrad else contextlib.nullcontext():
            out = self._forward(chunk, refine, want_context=True)
        count = len(chunk)
        margins = pair_margins(out.policy_chosen_logps, out.policy_rejected_logps, out.ref_chosen_logps,
                               out.ref_rejected_logps, beta=self.config.loss.beta)
        start = micro_batch_bounds(len(indices), self.world)[self.rank].start  # `worker_chunks`' split
        mask = self.selector.select(start=start, n=len(indices), losses=out.losses[:count],
                                    margins=margins[:count], chosen_logps=out.policy_chosen_logps[:count],
                                    context=out.context[:count])
        local = mask[start:start + count]
        scale = self.world / int(mask.sum())
        if regrad:  # the memory-saving variant: a second forward, with gradient, on the chosen pairs only
            picked = [pair for pair, keep in zip(chunk, local.tolist()) if keep]
            self.engine.backward(self._forward(picked).losses.sum() * (scale if picked else 0.0))
        else:
            self.engine.backward((out.losses[:count] * local.to(out.losses.dtype)).sum() * scale
                                 + out.losses.sum() * 0.0)
        return self._metric_sums(out, chunk)

    def _to_device(self, batch: dict) -> dict:
        return {key: value.to(self.device) for key, value in batch.items()}

    def train_step(self, step: int, epoch: int, indices: list[int]) -> dict | None:
        started, lr = time.perf_counter(), self.engine.lr
        accumulation = self.config.train.gradient_accumulation_steps
        chunks = worker_chunks(indices, splits=self.world * accumulation, rank=self.rank, per_worker=accumulation)
        refine = self.refiner.settings(step) if self.refiner else None
        if self.selector:
            sums = self._sams_batch(chunks[0], indices, refine)
        else:
            sums = sum(self._micro_batch(chunk, len(indices), refine) for chunk in chunks)
        grad_norm = self.engine.step()
        sums = _all_reduce(sums).cpu()
        if self.refiner:  # after the loss: step t's threshold used the margins up to step t - 1
            self.refiner.end_step(indices)
        try:
            metrics = metrics_from_sums(sums[:-2])
            if not math.isfinite(grad_norm):  # the engine did not apply this step
                raise FloatingPointError(f"non-finite gradient norm ({grad_norm})")
        except FloatingPointError as exc:
            self._fail(step + 1, f"{exc} at step {step + 1}; stopped. The last good checkpoint is "
                                 f"{ckpt.latest_checkpoint(self.run_dir) or 'none'}.")
            return None
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=self.device)
        seconds = _all_reduce(elapsed).cpu() / self.world
        metrics.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=float(sums[-2] / seconds[0]))
        if self.selector:
            metrics.update(self.selector.metrics())
        if refine is not None:
            metrics.update({"spa/relabelled": int(sums[-1]), "spa/threshold": refine.threshold,
                            "spa/active": int(refine.active)})
        return metrics

    def _fail(self, step: int, message: str) -> None:
        if self.rank == 0:
            atomic_write_text(self.run_dir / FAILURE_FILE, json.dumps({"step": step, "error": message}) + "\n")
            if self.store:
                storage_train.publish_failure(self.store, self.run_dir / FAILURE_FILE)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, reward accuracy and margins, each worker scoring an equal-length shard; on GDPO-format
        rows (loss.type gdpo, or the DPO baseline on them) also the alignment gap `eval/gdpo/js_gap`."""
        encoded, columns = self.eval
        shard = list(range(self.rank, len(encoded), self.world))
        per_worker, size = math.ceil(len(encoded) / self.world), self.config.ref.batch_size
        sums = torch.zeros(10, dtype=torch.float64, device=self.device)  # 8 pair metrics, then the gap's 2
        self.engine.module.eval()
        for start in range(0, per_worker, size):
            chunk = shard[start:start + size]
            index = torch.tensor(chunk or [0])
            batch = self._to_device(collate_with_reference(encoded, columns, index, kind=self.kind,
                                                           pad_token_id=self.tokenizer.pad_token_id))
            k = None if self.k is None else self._eval_k(columns, index).to(self.device)
            with self._autocast():
                out = micro_batch_loss(self.engine.module, batch, self.config, reference=self.reference,
                                       neg_log_dispersion=k, kind=self.kind)
            sums[:8] += bool(chunk) * pair_metric_sums(out.losses, out.policy_chosen_logps,
                                                       out.policy_rejected_logps, out.ref_chosen_logps,
                                                       out.ref_rejected_logps, beta=self.config.loss.beta)
            if self.kind in LEVEL_KINDS:
                sums[8:] += bool(chunk) * belief_gap_sums(out.level_logps, batch["target_probs"])
        self.engine.module.train()
        sums = _all_reduce(sums).cpu()
        metrics = metrics_from_sums(sums[:8], prefix="eval/")
        if sums[8] > 0:
            metrics[f"eval/{GAP_METRIC}"] = float(sums[9] / sums[8])
        return metrics

    def _eval_k(self, columns: dict, index: torch.Tensor) -> torch.Tensor:
        return unit_dispersion({k: v[index] for k, v in columns.items()}) * self.mallows_c

    def save(self, step: int, epoch: int) -> None:
        began = time.perf_counter()
        self._save(step, epoch)
        self.save_seconds += time.perf_counter() - began

    def _save(self, step: int, epoch: int) -> None:
        tmp = ckpt.begin(self.run_dir, step, rank=self.rank, node_leader=self.node_leader)
        self.engine.save(tmp, rank=self.rank)
        state_dict = self.engine.full_state_dict(tmp)
        if self.selector:
            self.selector.save(tmp)
        if self.rank == 0:
            if self.lora:
                from rayalign.lora import save_adapters

                save_adapters(self.policy, tmp, state_dict)
            else:
                save_weights(self.policy, tmp, state_dict)
            self.tokenizer.save_pretrained(tmp)
        state = {"step": step, "epoch": epoch, "total_steps": self.total,
                 **({"spa_window": self.refiner.state_dict()} if self.refiner else {})}
        done = ckpt.commit(tmp, state, rank=self.rank, keep=self.config.train.keep_checkpoints)
        if self.store:  # collective: DeepSpeed's ranks each upload their own shards
            storage_train.publish_checkpoint(self.store, done, tmp, keep=self.config.train.keep_checkpoints,
                                             rank=self.rank, node_leader=self.node_leader)
        self.saved_at = time.monotonic()

    def save_final(self) -> None:
        """RUN_DIR/final/: the consolidated model (16-bit in a bf16 run), the tokenizer and, with SamS, the
        selector's state (`sams.pt`, which the loop's next iteration continues from); no optimizer or DeepSpeed
        state and no last checkpoint (a kill before final/ exists resumes from the newest periodic one and
        redoes the steps after it). Collective: ZeRO-3 gathers the weights on rank 0."""
        began = time.perf_counter()
        state_dict = None if self.lora else self.engine.full_state_dict(self.run_dir)
        if self.rank == 0:
            dtype = torch.bfloat16 if self.config.train.precision == "bf16" else None
            with atomic_directory(self.run_dir / "final") as out:
                if self.lora:  # a plain HF model, the adapters merged: the next stages load it as any other
                    from rayalign.lora import save_merged

                    saved = save_merged(self.policy, out, dtype=dtype)
                else:
                    saved = save_weights(self.policy, out, state_dict, dtype=dtype)
                self.tokenizer.save_pretrained(out)
                if self.selector:
                    self.selector.save(out)
            if self.paths.get("push_weights"):  # the loop's persistent generators and judges (`rayalign.host_pool`)
                from rayalign.host_pool import push_weights

                push_weights(self.paths["push_weights"], saved)
        ckpt.barrier()  # no rank reports the stage done before final/ exists
        self.save_seconds += time.perf_counter() - began

    def _due(self, every: int, step: int) -> bool:
        return every > 0 and step % every == 0 and step < self.total

    def _checkpoint_due(self, step: int) -> bool:
        """After optimizer step `step` (not the last: the final save follows): at an epoch end, every
        train.save_every steps, or once train.save_every_minutes of training passed since the last save."""
        train = self.config.train
        if step >= self.total:
            return False
        if step % self.steps_per_epoch == 0 or self._due(train.save_every, step):
            return True
        if train.save_every_minutes <= 0:
            return False
        # Saving is collective (DeepSpeed, the barriers): rank 0's clock decides, the all-reduce shares it.
        late = self.rank == 0 and time.monotonic() - self.saved_at >= 60 * train.save_every_minutes
        return bool(_all_reduce(torch.tensor([float(late)], device=self.device)).item())

    def run(self) -> None:
        import ray.train

        epoch = ckpt.read_state(self.resume_from)["epoch"] if self.resume_from else 0
        self.saved_at, self.save_seconds, began = time.monotonic(), 0.0, time.perf_counter()
        for step, (epoch, indices) in enumerate(step_batches(len(self.encoded), self.config.train, self.inputs.epochs)):
            if step >= self.total:
                break
            if step < self.start_step:
                continue
            inject_fault(self.paths.get("kill_worker_at"), step + 1, self.rank, self.run_dir)
            metrics = self.train_step(step, epoch, indices)
            if metrics is None:
                return
            if self.eval and self._due(self.config.train.eval_every, step + 1):
                metrics.update(self.evaluate())
            self.log.write(metrics)
            if "eval/loss" in metrics:  # Tune's schedulers read these; every step would flood the driver log
                ray.train.report(metrics)
            if self._checkpoint_due(step + 1):
                self.save(step + 1, epoch)
        final_metrics = {"step": self.total, **(self.evaluate() if self.eval else {})}
        self.save_final()
        if self.rank == 0:  # the stage's timing (`rayalign.stage_timing`): start-up, steps and saves
            seconds = {"start": began - self.created, "steps": time.perf_counter() - began - self.save_seconds,
                       "save": self.save_seconds}
            atomic_write_text(self.run_dir / WORKER_FILE, json.dumps({k: round(v, 2) for k, v in seconds.items()}))
        self.log.close(final_metrics)
        if self.store and self.rank == 0:  # final/ last: the stage's completion marker in storage
            storage_train.publish_outputs(self.store)
        ray.train.report(final_metrics)


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train entry point (`TorchTrainer(train_fn_per_worker, train_loop_config=...)`)."""
    Worker(loop_config).run()
