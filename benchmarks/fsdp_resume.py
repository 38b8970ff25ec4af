"""Kill -9 an FSDP-QLoRA run on 2 GPUs (8 GiB cap each), resume it, compare with an unbroken run.

    bash benchmarks/fsdp_resume.sh               # on a 2-GPU host; writes $OUT/fsdp_resume.json
    python benchmarks/fsdp_resume.py --out fsdp_resume.json [--layers 22] [--steps 4]
    python benchmarks/fsdp_resume.py --out /tmp/smoke.json --smoke-cpu   # the same flow on CPU:
                                                 # DDP over gloo, tiny-random, no FSDP, no cap

Every training run is the unchanged `qlora-lab train` CLI under
`accelerate launch --config_file configs/accelerate_fsdp.yaml` (FSDP1, FULL_SHARD, sharded
checkpoints), started through this file's `worker` mode, which caps each process's GPU memory
(benchmarks/fsdp_qlora.py's worker) before it calls the CLI. Phases, each logged as it starts:

1. build: a random-weight TinyLlama-1.1B shape (fsdp_qlora.build_model, --layers N);
2. uninterrupted: --steps optimizer steps on 2 GPUs, a checkpoint every --save-steps;
3. killed: the same run, SIGKILLed (launcher and every worker) as soon as its first checkpoint
   is published (checkpoints/checkpoint-K appears only once complete);
4. one_gpu: `--resume` of a copy of that run on 1 GPU: expected to be refused with one line
   naming the process count; the copy's files must be unchanged;
5. resumed: `--resume` on 2 GPUs, then the final adapter against (2)'s: max abs difference.
   As a control, checkpoint-K of (2) and (3) (the same steps, no resume in between) are compared
   too: a difference there is run-to-run GPU nondeterminism, not something resume did.

FSDP's sharded checkpoints (the adapter and optimizer in torch.distributed.checkpoint folders)
are judged by `checkpoints.sharded_problem`; the report records its verdict.
Every subprocess has a timeout and the whole script a deadline (--budget-s); a timed-out launch is
killed with all its workers, and the JSON is written after every phase.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from fixtures import GIB, ROOT, default_data, hardware_label, versions

# What accelerate and torch.distributed write inside an FSDP SHARDED_STATE_DICT checkpoint.
FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"
ADAPTER = "adapter/adapter_model.safetensors"
# NVLink multicast stays off on the shared hosts (device notes); children inherit these.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def log(msg: str) -> None:
    print(f"[fsdp_resume {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the proposed src fix, for the worker processes only -----------------------------------------


def sharded_checkpoint_problem(path: Path) -> str | None:
    """Why an FSDP SHARDED_STATE_DICT checkpoint cannot be resumed from (checkpoints.py's rule)."""
    from qlora_lab.checkpoints import sharded_problem

    return sharded_problem(path)


def worker(argv: list[str]) -> int:
    """`worker --cap-gib X --peak-dir D -- train ...`: one rank's CLI run."""
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="fsdp_resume.py worker")
    parser.add_argument("--cap-gib", type=float, default=0.0, help="0: no cap, no CUDA")
    parser.add_argument("--peak-dir", required=True)
    opts = parser.parse_args(argv[:cut])
    if opts.cap_gib > 0:
        from fsdp_qlora import worker as capped_worker  # benchmarks/ is sys.path[0]

        return capped_worker(opts.cap_gib, Path(opts.peak_dir), argv[cut + 1:])
    from qlora_lab.cli import main as cli_main

    return cli_main(argv[cut + 1:])


# --- launching and killing ------------------------------------------------------------------------


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a launcher and every process under it; return the pids that survived.

    torchrun (and accelerate launch, which runs it) starts each worker in a session of its own,
    so the launcher's process group alone would leave the workers training as orphans.
    """
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    groups = {proc.pid}
    for p in workers:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in workers:  # anyone who had moved to a group of its own
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(workers, timeout=30)
    return [p.pid for p in alive]


_RUNNING: list[subprocess.Popen] = []  # the launch in flight, for the SIGTERM handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Builds and runs one `qlora-lab train` launch on N processes, with a log and a deadline."""

    def __init__(self, args, work: Path, deadline: float):
        self.args, self.work, self.deadline = args, work, deadline

    def command(self, nproc: int, peak_dir: Path, train_args: list[str]) -> list[str]:
        me = str(Path(__file__).resolve())
        worker_args = ["worker", "--cap-gib", str(0 if self.args.smoke_cpu else self.args.cap_gib),
                       "--peak-dir", str(peak_dir), "--", *train_args]
        if self.args.smoke_cpu:
            if nproc == 1:
                return [sys.executable, me, *worker_args]
            return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--master-port", str(free_port()), me, *worker_args]
        threads = max(1, (os.cpu_count() or 2) // nproc)  # CPU quantization of the base uses them
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate_fsdp.yaml"), "--num_processes", str(nproc),
                "--num_cpu_threads_per_process", str(threads), "--main_process_port",
                str(free_port()), me, *worker_args]

    def run(self, name: str, nproc: int, train_args: list[str],
            kill_at: Path | None = None) -> dict:
        """Run a launch to its end, or until `kill_at` exists (then SIGKILL it), or time out."""
        peak_dir = self.work / "peaks" / name
        shutil.rmtree(peak_dir, ignore_errors=True)
        cmd = self.command(nproc, peak_dir, train_args)
        timeout = min(self.args.launch_timeout, self.deadline - time.monotonic() - 15)
        result = {"command": " ".join(cmd), "processes": nproc}
        if timeout < 20:
            log(f"{name}: skipped, {timeout:.0f} s left before the deadline")
            return {**result, "skipped": "out of time (--budget-s)"}
        log(f"{name}: {nproc} process(es), timeout {timeout:.0f} s"
            + (f", kill -9 once {kill_at.name} exists" if kill_at else ""))
        logfile = self.work / "logs" / f"{name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(logfile, "w") as out:  # a file, not a pipe: a full pipe stalls the workers
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **NO_MULTICAST},
                                    start_new_session=True, cwd=ROOT)
            _RUNNING.append(proc)
            try:
                result.update(self._wait(proc, kill_at, start + timeout))
            finally:
                _RUNNING.remove(proc)
        result["wall_seconds"] = round(time.perf_counter() - start, 2)
        text = logfile.read_text(errors="replace")
        result["error_lines"] = [line.strip() for line in text.splitlines()
                                 if "qlora-lab train: error:" in line][:4]
        result["tracebacks_in_log"] = text.count("Traceback (most recent call last)")
        result["per_rank"] = [json.loads(p.read_text()) for p in sorted(peak_dir.glob("rank*"))]
        if result.get("exit_code") not in (0, None) or result.get("timed_out"):
            result["log_tail"] = text[-2500:]
        log(f"{name}: exit {result.get('exit_code')} in {result['wall_seconds']} s"
            + (f"; {result['error_lines'][0][:300]}" if result["error_lines"] else ""))
        return result

    @staticmethod
    def _wait(proc: subprocess.Popen, kill_at: Path | None, give_up: float) -> dict:
        while True:
            code = proc.poll()
            if code is not None:
                return {"exit_code": code}
            if kill_at is not None and kill_at.is_dir():
                survivors = kill_job(proc)
                return {"exit_code": proc.returncode, "killed_after": kill_at.name,
                        "survivors": survivors}
            if time.perf_counter() > give_up:
                survivors = kill_job(proc)
                return {"exit_code": proc.returncode, "timed_out": True, "survivors": survivors}
            time.sleep(0.01)


# --- reading results -----------------------------------------------------------------------------


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def losses(run: Path) -> dict:
    """Training loss by step from metrics.jsonl (a line cut by the kill is skipped)."""
    found = {}
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record and "train_loss" not in record:
            found[record["step"]] = record["loss"]
    return found


def checkpoint_adapter(ckpt: Path) -> dict:
    """A checkpoint's adapter tensors: its safetensors, or its sharded DCP folder gathered."""
    import torch
    from safetensors.torch import load_file

    if (ckpt / "adapter_model.safetensors").is_file():
        return load_file(ckpt / "adapter_model.safetensors")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    gathered = ckpt.parent.parent / f"{ckpt.name}.gathered.pt"
    dcp_to_torch_save(ckpt / FSDP_MODEL_DIR, gathered)  # no process group needed
    flat, stack = {}, [("", torch.load(gathered, weights_only=True))]
    gathered.unlink()
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{prefix}{k}.", v) for k, v in value.items()]
        elif isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value
    return flat


def compare(expected: dict, actual: dict) -> dict:
    if expected.keys() != actual.keys():
        return {"same_keys": False, "only_expected": sorted(expected.keys() - actual.keys())[:5],
                "only_actual": sorted(actual.keys() - expected.keys())[:5]}
    if not expected:  # both adapters empty (peft 0.21 under FSDP before save_adapter's fix)
        return {"same_keys": True, "tensors": 0, "note": "0 tensors: both adapters are empty"}
    diffs = [(expected[k].float() - actual[k].float()).abs().max().item() for k in expected]
    return {"same_keys": True, "tensors": len(expected),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in expected.values()}),
            "max_abs_diff": max(diffs), "bit_identical_tensors": sum(d == 0 for d in diffs),
            "max_abs_value": max(t.float().abs().max().item() for t in expected.values())}


# --- the benchmark -------------------------------------------------------------------------------


def train_args(args, base: str, data: str, out: Path) -> list[str]:
    common = ["train", "--model", base, "--data", data, "--output-dir", str(out),
              "--max-steps", str(args.steps), "--save-steps", str(args.save_steps), "--overwrite",
              "--set", "data.eval_fraction=0", "--set", "train.tensorboard=false",
              "--set", "train.logging_steps=1", "--set", "train.warmup_ratio=0",
              "--set", f"train.learning_rate={args.learning_rate}",
              "--set", f"train.grad_accum_steps={args.grad_accum}"]
    if args.smoke_cpu:
        return [*common, "--set", "train.micro_batch_size=2"]
    return [*common, "--config", args.config, *args.extra]


def run_phases(args, report: dict, write) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    launch = Launcher(args, work, time.monotonic() + args.budget_s)
    phases = report["phases"]
    if args.smoke_cpu:
        base = "tiny-random"
    else:
        import torch
        from fsdp_qlora import build_model  # benchmarks/ is sys.path[0]

        from qlora_lab.presets import PRESETS

        log(f"build: {args.layers}-layer TinyLlama shape in {work}")
        start = time.perf_counter()
        base = str(build_model(work / f"tinyllama-shape-{args.layers}l",
                               {**PRESETS["tinyllama"].arch, "num_hidden_layers": args.layers},
                               Path(args.data), "cuda" if torch.cuda.is_available() else "cpu"))
        report["build_seconds"] = round(time.perf_counter() - start, 2)
    unbroken, killed, alone = work / "uninterrupted", work / "killed", work / "one_gpu_copy"
    # A warm machine keeps /tmp between calls: an earlier call's checkpoint must not stand in
    # for this call's kill.
    for run in (unbroken, killed, alone):
        shutil.rmtree(run, ignore_errors=True)
    first = f"checkpoint-{args.save_steps}"

    phases["uninterrupted"] = launch.run("uninterrupted", args.gpus,
                                         train_args(args, base, args.data, unbroken))
    write()
    if phases["uninterrupted"].get("exit_code") != 0:
        raise RuntimeError("the uninterrupted run failed: see phases.uninterrupted.log_tail")
    phases["killed"] = launch.run("killed", args.gpus, train_args(args, base, args.data, killed),
                                  kill_at=killed / "checkpoints" / first)
    write()
    ckpt = killed / "checkpoints" / first
    if not ckpt.is_dir():
        raise RuntimeError(f"the killed run has no {first}: see phases.killed")
    from qlora_lab import checkpoints

    verdict = checkpoints.problem(ckpt)
    sharded = (ckpt / FSDP_MODEL_DIR).is_dir()
    report["checkpoint"] = {
        "path": str(ckpt), "files": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                                           if p.is_file())[:40],
        "layout": json.loads((ckpt / checkpoints.LAYOUT_FILE).read_text())
        if (ckpt / checkpoints.LAYOUT_FILE).is_file() else None,
        "sharded_fsdp": sharded, "src_problem_verdict": verdict,
        "sharded_problem_verdict": sharded_checkpoint_problem(ckpt) if sharded else None}
    if verdict is not None:
        log(f"checkpoints.problem refuses {first}: it {verdict}")
    write()

    # 4. one GPU, on a copy: if it were accepted, it must not touch the run that phase 5 resumes.
    def resume(run: Path) -> list[str]:
        return ["train", "--output-dir", str(run), "--resume"]

    shutil.rmtree(alone, ignore_errors=True)
    shutil.copytree(killed, alone)
    before = snapshot(alone)
    phases["one_gpu"] = launch.run("one_gpu", 1, resume(alone))
    phases["one_gpu"]["files_unchanged"] = snapshot(alone) == before
    write()

    # 5. two GPUs.
    phases["resumed"] = launch.run("resumed", args.gpus, resume(killed))
    report["final_phase"] = "resumed"
    write()

    if (unbroken / ADAPTER).is_file() and (killed / ADAPTER).is_file():
        from safetensors.torch import load_file

        report["adapter"] = compare(load_file(unbroken / ADAPTER), load_file(killed / ADAPTER))
    try:  # the control: the same first K steps, no resume in between
        report["control_checkpoint"] = compare(
            checkpoint_adapter(unbroken / "checkpoints" / first), checkpoint_adapter(ckpt))
    except Exception as exc:  # noqa: BLE001 - a missing control must not cost the main result
        report["control_checkpoint"] = {"error": f"{type(exc).__name__}: {exc}"}
    report["losses"] = {"uninterrupted": losses(unbroken), "killed_then_resumed": losses(killed)}


def headline(report: dict) -> dict:
    phases, adapter = report["phases"], report.get("adapter", {})
    final = phases.get(report.get("final_phase", ""), {})
    head = {"resumed": final.get("exit_code") == 0,
            "src_problem_verdict": report.get("checkpoint", {}).get("src_problem_verdict")}
    if "max_abs_diff" in adapter:
        head.update(max_abs_diff=adapter["max_abs_diff"], adapter_dtypes=adapter["dtypes"],
                    within_1e_6=adapter["max_abs_diff"] <= 1e-6)
    if "max_abs_diff" in report.get("control_checkpoint", {}):
        head["control_max_abs_diff_at_checkpoint"] = report["control_checkpoint"]["max_abs_diff"]
    for name in ("one_gpu",):
        if name in phases:
            one = phases[name]
            head[name] = {"exit_code": one.get("exit_code"),
                          "worker_exit_codes": [r.get("exit_code") for r in one.get("per_rank", [])],
                          "message": (one.get("error_lines") or [None])[0],
                          "files_unchanged": one.get("files_unchanged")}
    peaks = [r["peak_allocated_bytes"] for r in final.get("per_rank", [])
             if r.get("peak_allocated_bytes")]
    if peaks:
        head["resumed_peak_allocated_gib_per_gpu"] = [round(p / GIB, 3) for p in peaks]
    head["wall_seconds"] = {k: v.get("wall_seconds") for k, v in phases.items()}
    return head


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2:])
    from fsdp_qlora import common_arguments  # benchmarks/ is sys.path[0]

    parser = common_arguments(__doc__.splitlines()[0], 22, "TinyLlama", 4,
                              "/tmp/qlora-fsdp-resume")
    parser.add_argument("--save-steps", type=int, default=2, help="the kill follows the first")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--launch-timeout", type=int, default=150, help="seconds per launch")
    parser.add_argument("--budget-s", type=int, default=420,
                        help="deadline for the whole script; later launches are skipped")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="the flow on CPU: DDP over gloo, tiny-random, no FSDP")
    parser.add_argument("--set", dest="extra_sets", action="append",
                        default=["train.liger=off"],
                        help="extra section.key=value for train (repeatable; default "
                             "train.liger=off, as benchmarks/results/fsdp_qlora.json ran)")
    args = parser.parse_args()
    args.extra = [x for s in args.extra_sets for x in ("--set", s)]
    args.data = args.data or default_data()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python " + " ".join(sys.argv), "issue": 18, "data": args.data,
                    "config": None if args.smoke_cpu else args.config,
                    "accelerate_config": None if args.smoke_cpu
                    else "configs/accelerate_fsdp.yaml",
                    "model": "tiny-random (smoke, CPU, DDP over gloo)" if args.smoke_cpu
                    else f"TinyLlama-1.1B shape ({args.layers} layers), random bf16 weights, NF4",
                    "gpus": args.gpus, "memory_cap_gib_per_gpu": None if args.smoke_cpu
                    else args.cap_gib, "steps": args.steps, "save_steps": args.save_steps,
                    "kill": f"SIGKILL to the launcher and all its workers once "
                            f"checkpoint-{args.save_steps} is published",
                    "phases": {}}

    def write() -> None:
        report["headline"] = headline(report)
        out.write_text(json.dumps(report, indent=2) + "\n")

    def on_sigterm(signum, frame):  # `timeout` around this script: leave no workers behind
        for proc in _RUNNING[:]:
            kill_job(proc)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report["versions"] = versions()
        report["hardware"] = hardware_label()
        run_phases(args, report, write)
    except BaseException as exc:  # noqa: BLE001 - partial results are still worth keeping
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-3000:]
        log(report["error"])
    write()
    log(f"wrote {out}: {json.dumps(report['headline'])}")
    return 0 if "error" not in report and report["headline"]["resumed"] else 1


if __name__ == "__main__":
    sys.exit(main())
