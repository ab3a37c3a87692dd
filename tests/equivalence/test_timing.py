"""converter.equivalence.timing: how rounds are planned and judged (a fake clock), what a
benchmark result holds and says (issue 18). No test asserts a speed: the machine is shared."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from builders import linear_chain
from onnx import TensorProto, helper

from converter.equivalence import timing
from converter.equivalence.timing import BenchmarkOptions, BenchmarkResult, Timing
from converter.errors import InputError


class Clock:
    """A fake ``perf_counter``: time moves only when a fake run says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[int] = []  # which run, in call order

    def __call__(self) -> float:
        return self.now

    def run(self, index: int, seconds) -> callable:
        """A run taking ``seconds`` (a float, or a callable of the call count)."""
        count = [0]

        def call() -> None:
            self.calls.append(index)
            self.now += seconds(count[0]) if callable(seconds) else seconds
            count[0] += 1

        return call


# --------------------------------------------------------------------------- planning rounds


def test_rounds_fill_the_budget_and_rotate_the_order():
    clock = Clock()
    runs = [clock.run(i, s) for i, s in enumerate((1e-3, 1e-3, 1.2e-3))]
    found = timing.measure(runs, budget=1.0, timer=clock)
    assert found.seconds == pytest.approx((1e-3, 1e-3, 1.2e-3))
    assert found.runs_per_round == 1  # one run already takes about ROUND_SECONDS
    assert timing.MIN_ROUNDS < found.rounds <= timing.MAX_ROUNDS
    assert clock.now <= 1.0 + 2e-3  # calibration included, within a round
    timed = clock.calls[-3 * found.rounds :]  # the rounds, after warm-up and calibration
    firsts = [timed[3 * r] for r in range(found.rounds)]
    assert firsts[:6] == [0, 1, 2, 0, 1, 2]  # each round starts one session later


def test_a_fast_model_runs_many_times_per_round_within_the_budget():
    clock = Clock()
    runs = [clock.run(i, 1e-6) for i in range(3)]
    found = timing.measure(runs, budget=0.5, timer=clock)
    assert 999 <= found.runs_per_round <= timing.ROUND_SECONDS / 1e-6  # float sums
    assert found.seconds == pytest.approx((1e-6,) * 3)
    assert 0.49 < clock.now <= 0.5 + 3e-3


def test_a_slow_model_gets_the_fewest_rounds_and_a_bounded_time():
    clock = Clock()
    runs = [clock.run(i, 2.0) for i in range(3)]  # two seconds a run, a budget of one
    found = timing.measure(runs, budget=1.0, timer=clock)
    assert (found.rounds, found.runs_per_round) == (timing.MIN_ROUNDS, 1)
    # one untimed run, one calibration run and MIN_ROUNDS timed runs of each
    assert clock.now == pytest.approx(3 * (2 + timing.MIN_ROUNDS) * 2.0)


def test_bursts_of_other_work_and_a_lucky_round_do_not_move_the_figure():
    """Most rounds of each session are slowed 3x (other processes had the core), and one round
    of one session is twice as fast as the model can be (a clock fluke): the figure is the
    model's own time (a median would be 3x; a minimum, half), and equal models come out equal."""
    clock = Clock()
    rng = np.random.default_rng(0)
    slow = [set(rng.choice(2000, 1200, replace=False)) for _ in range(3)]

    def seconds(i: int, n: int) -> float:
        if i == 0 and n == 100:
            return 0.5e-3
        return 3e-3 if n in slow[i] else 1e-3

    runs = [clock.run(i, lambda n, i=i: seconds(i, n)) for i in range(3)]
    found = timing.measure(runs, budget=2.0, timer=clock)
    assert found.rounds > 100
    assert found.seconds == pytest.approx((1e-3,) * 3)


# --------------------------------------------------------------------------- the verdict


@pytest.fixture
def two_files(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(linear_chain([8, 16, 4]), a)
    onnx.save(linear_chain([8, 4], seed=1), b)
    return a, b


def _judged(monkeypatch, two_files, seconds) -> BenchmarkResult:
    """The result of a benchmark whose measurement found ``seconds`` per run of the original,
    its second session and the candidate."""
    monkeypatch.setattr(timing, "measure", lambda runs, **_: Timing(seconds, 40, 2))
    feeds = {"x": np.ones((2, 8), np.float32)}
    return timing.benchmark(*two_files, feeds, BenchmarkOptions(), inputs="ones")


@pytest.mark.parametrize(
    ("seconds", "slower"),
    [
        ((1e-3, 1e-3, 1.1e-3), True),  # 10% slower, no noise
        ((1e-3, 1e-3, 1.015e-3), False),  # within the floor
        ((1e-3, 1.1e-3, 1.1e-3), False),  # 4.8% slower, but the original varies by 9.5%
        ((1e-3, 1.02e-3, 1.2e-3), True),  # beyond the noise of 2%
        ((1e-3, 1e-3, 0.5e-3), False),  # twice as fast
    ],
)
def test_slower_means_beyond_the_noise_of_the_original_against_itself(
    monkeypatch, two_files, seconds, slower
):
    result = _judged(monkeypatch, two_files, seconds)
    original = (seconds[0] + seconds[1]) / 2
    assert result.original_ms == pytest.approx(original * 1e3)
    assert result.candidate_ms == pytest.approx(seconds[2] * 1e3)
    assert result.ratio == pytest.approx(seconds[2] / original)
    assert result.noise == pytest.approx(abs(seconds[0] - seconds[1]) / original)
    assert result.slower is slower
    warned = [w for w in result.warnings("the fused model") if "slower" in w]
    assert len(warned) == int(slower)
    if slower:
        assert warned[0].startswith("benchmark: the fused model is slower than the original")
        assert f"{result.ratio:.2f}x" in warned[0] and "\n" not in warned[0]


def test_the_result_prints_the_issue_line_and_is_json(monkeypatch, two_files):
    result = _judged(monkeypatch, two_files, (12.4e-3, 12.4e-3, 10.9e-3))
    assert result.summary_lines() == [
        "latency under onnxruntime CPU (1 thread): 12.4 ms -> 10.9 ms (0.88x)"
    ]
    verbose = result.summary_lines(verbose=True)
    assert verbose[1] == "fused kernels under onnxruntime: none"
    assert verbose[2].startswith("benchmark: 40 interleaved rounds of 2 run(s) per model")
    assert "noise 0.0%" in verbose[2] and verbose[2].endswith("inputs: ones")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["ratio"] == pytest.approx(10.9 / 12.4) and data["slower"] is False
    assert (data["threads"], data["provider"], data["rounds"]) == (1, "CPUExecutionProvider", 40)
    assert data["kernels_before"] == data["kernels_after"] == {} and data["lost_kernels"] == []


def _gelu(exact: bool) -> onnx.ModelProto:
    """``y = x * 0.5 * (1 + erf(x / sqrt 2))``, which onnxruntime fuses into one ``Gelu``; with
    ``exact=False`` the ``* 0.5`` is folded away (into a next layer, say) and the kernel lost."""
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["m" if exact else "y"]),
    ]
    if exact:
        nodes.append(helper.make_node("Mul", ["m", "half"], ["y"]))
    consts = {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [], [v]) for k, v in consts.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_lost_fused_kernel_is_counted_printed_and_warned(tmp_path):
    original, candidate = tmp_path / "gelu.onnx", tmp_path / "folded.onnx"
    onnx.save(_gelu(True), original)
    onnx.save(_gelu(False), candidate)
    feeds = {"x": np.random.default_rng(0).uniform(-1, 1, (4, 16)).astype(np.float32)}
    result = timing.benchmark(original, candidate, feeds, BenchmarkOptions(budget=0.05))
    assert (result.kernels_before, result.kernels_after) == ({"Gelu": 1}, {})
    assert result.lost_kernels == ["Gelu 1 -> 0"]
    assert "fused kernels under onnxruntime: Gelu 1 -> 0" in result.summary_lines()
    (warning,) = [w for w in result.warnings() if "kernels" in w]
    assert (
        warning == "benchmark: onnxruntime makes fewer fused kernels of the candidate: Gelu 1 -> 0"
    )
    assert re.fullmatch(
        r"latency under onnxruntime CPU \(1 thread\): .+ \(\d+\.\d\dx\)", result.summary_lines()[0]
    )


def test_in_memory_models_are_timed_as_they_are(two_files):
    original = onnx.load(two_files[0])
    feeds = {"x": np.ones((3, 8), np.float32)}
    result = timing.benchmark(original, two_files[1], feeds, BenchmarkOptions(budget=0.05))
    assert result.rounds >= timing.MIN_ROUNDS and result.original_ms > 0


def test_a_model_onnxruntime_cannot_run_is_an_input_error_naming_it(tmp_path, two_files):
    broken = linear_chain([8, 4])
    broken.graph.node[0].op_type = "Frobnicate"
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    feeds = {"x": np.ones((2, 8), np.float32)}
    with pytest.raises(InputError, match=r"onnxruntime CPU cannot run the candidate model \("):
        timing.benchmark(two_files[0], path, feeds, BenchmarkOptions(budget=0.05))


# --------------------------------------------------------------------------- options


def test_options_refuse_an_unavailable_provider_naming_the_available_ones():
    with pytest.raises(InputError, match="'NoSuchExecutionProvider' is not available") as error:
        timing.options_of(BenchmarkOptions(provider="NoSuchExecutionProvider"))
    assert "CPUExecutionProvider" in str(error.value)


@pytest.mark.parametrize("options", [BenchmarkOptions(threads=0), BenchmarkOptions(budget=0)])
def test_options_refuse_no_threads_and_no_budget(options):
    with pytest.raises(InputError):
        timing.options_of(options)


def test_options_of_a_bool():
    assert timing.options_of(False) is None and timing.options_of(None) is None
    assert timing.options_of(True) == BenchmarkOptions(threads=1, provider="CPUExecutionProvider")
    threads = BenchmarkOptions(threads=2)
    assert timing.options_of(threads) is threads
    assert threads.budget == BenchmarkOptions().budget
