"""The model benchmarks in bench/ run at tiny shapes on CPU and print the line their readers look for.

The numbers are not checked (timing belongs to the benches, not to tests); the code paths the GPU runs are:
each bench takes the same flags at 7B shapes (``--seven-b``), where only the sizes differ. (data_cache.py and
ensemble_fit.py are CPU benches with no model shapes; ``make bench`` runs them at full size.)
"""

import re

import pytest

from tests.recipes.launch import python

BENCHES = {  # script -> (tiny arguments, a pattern of its last line)
    "bench/sft_step.py": (["--steps", "2", "--warmup", "1", "--batch", "1", "--clips", "dcase", "--group-by-length",
                           "--gradient-checkpointing"], r"step_s=\S+ tokens_per_s=\d+ .*mfu=\S+"),
    "bench/grpo_step.py": (["--questions", "2", "--generations", "3", "--max-new-tokens", "3", "--steps", "1",
                            "--no-memory"],
                           r"shared_speedup=\S+ speedup=\S+"),
    "bench/decode_speed.py": (["--questions", "2", "--generations", "3", "--max-new-tokens", "4", "--clip-seconds",
                               "1", "--repeats", "1"], r"decode_ms_per_step=\S+ bound_ms=\S+ .*ratio=\S+"),
    "bench/infer_speed.py": (["--questions", "4", "--k", "2"], r"logits_vs_generate=\S+"),
    "bench/infer_scale.py": (["--small", "12", "--large", "48", "--clips", "6", "--speed-questions", "24",
                              "--batch-size", "4"],
                             r"rss_large_vs_small=\S+ .*qps_last_vs_first_quarter=\S+ .*speedup_2_ranks=\S+"),
}


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_bench_runs_at_tiny_shapes(script):
    args, pattern = BENCHES[script]
    out = python(script, *args, timeout=300).stdout
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert re.search(pattern, last), out[-2000:]
    if "--no-memory" in args:  # memory skipped is said so, not printed as nan
        assert "not measured" in last and "nan" not in out, out[-2000:]


def test_grpo_bench_runs_one_layout_in_question_chunks_with_its_memory():
    """The report's-batch check of bench/gpu_check.sh at tiny shapes: the static layout alone, its reference and
    policy passes in chunks of questions (as batch.update_chunk), peak memory measured in a child process."""
    out = python("bench/grpo_step.py", "--questions", "4", "--generations", "3", "--max-new-tokens", "3",
                 "--steps", "1", "--layouts", "static", "--update-chunk", "2", timeout=300).stdout
    assert "passes in chunks of 2" in out, out[-2000:]
    static = [line for line in out.splitlines() if line.strip().startswith("static:")]
    assert len(static) == 1 and re.search(r"peak memory \+\s*\d+\.\d MiB", static[0]), out[-2000:]
    assert re.search(r"static=\S+s \(speedups need the naive and static layouts\)", out.splitlines()[-1])
    bad = python("bench/grpo_step.py", "--questions", "4", "--update-chunk", "3", "--no-memory", check=False)
    assert bad.returncode != 0 and "--update-chunk must divide --questions" in bad.stderr
