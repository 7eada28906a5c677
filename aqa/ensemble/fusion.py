"""The learnable ensemble: a temperature and a weight per member, fitted on dev prediction files.

It works on prediction files alone (the predictions JSONL contract, see ``aqa.eval.metrics``). Members are
aligned by question id; option logits are padded to the largest option count with a mask, and

    p(option) = sum_m w_m * softmax(z_m / T_m)(option),    w = softmax(v),  T_m = exp(log_t_m)

is fitted by full-batch Adam on the dev cross-entropy (steps and lr from ``configs/ensemble.yaml``).
Both parameters start at the uniform average of the uncalibrated members (v = 0, T = init_temperature),
so the fit is deterministic. ``aqa.ensemble.run`` writes the output files around it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from aqa.eval.metrics import accuracy_by_part, expected_calibration_error, read_predictions

# Padding options get this logit after temperature scaling: exp() of it is exactly 0 in float64, yet it stays
# finite, so logsumexp over members never meets an all -inf slice (whose gradient would be NaN).
PAD_LOGIT = -1e30
MAX_LISTED = 10  # ids named in an alignment error before "... and N more"


@dataclass
class Aligned:
    """Members' predictions for the same questions, in one padded array.

    ``logits`` is ``[M, N, K]`` (float64, 0 in padding), ``mask`` ``[N, K]`` (True on real options),
    ``answers`` ``[N]`` (option index, -1 where the answer is unknown, as on eval).
    """

    members: list[str]
    ids: list[str]
    parts: list[str]
    choices: list[list[str]]
    answers: np.ndarray
    logits: np.ndarray
    mask: np.ndarray
    raw_choices: list[list[str] | None] | None = None  # the source's option strings, for the submission

    @property
    def has_answers(self) -> bool:
        return bool((self.answers >= 0).all())

    def member(self, m: int) -> Aligned:
        """Member ``m`` alone (``logits [1, N, K]``), e.g. to calibrate it by itself."""
        return dataclasses.replace(self, members=[self.members[m]], logits=self.logits[m : m + 1])


def load_member(path: str) -> list[dict[str, Any]]:
    """Read one member's predictions; an empty file or a non-finite logit is an error that names the file."""
    rows = read_predictions(path)
    if not rows:
        raise ValueError(f"member predictions {path} hold no rows; re-run inference/run.py for this member "
                         "or drop it from the ensemble's members.")
    for row in rows:
        if not all(math.isfinite(float(x)) for x in row["option_logits"]):
            raise ValueError(f"{path}: question {row['id']!r} has a non-finite option logit; re-run its inference.")
    return rows


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def align(members: dict[str, list[dict[str, Any]]], need_answers: bool = False) -> Aligned:
    """Align members' prediction rows by id (the first member's order).

    Raises ValueError listing the ids a member lacks or has extra, the ids whose choices (or answers) differ
    between members, and, with ``need_answers`` (dev, to fit), the ids without an answer.
    """
    if not members:
        raise ValueError("the ensemble needs at least one member; name them with --dev or in configs/ensemble.yaml.")
    by_id: dict[str, dict[str, dict[str, Any]]] = {}
    for name, rows in members.items():
        seen: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["id"] in seen:
                raise ValueError(f"member '{name}' repeats question id {row['id']!r}; each id must appear once.")
            seen[row["id"]] = row
        by_id[name] = seen
    names = list(members)
    ids = [r["id"] for r in members[names[0]]]
    all_ids = set().union(*(set(s) for s in by_id.values()))
    problems = []
    for name in names:
        missing = [i for i in ids if i not in by_id[name]] + sorted(all_ids - set(ids) - set(by_id[name]))
        if missing:
            problems.append(f"member '{name}' lacks {len(missing)} id(s): {_listing(missing)}")
    if problems:
        raise ValueError("members do not cover the same questions (score every member on the same manifest "
                         "split, with limit: null):\n  " + "\n  ".join(problems))

    ref = by_id[names[0]]
    bad_choices = [i for i in ids if any(by_id[n][i]["choices"] != ref[i]["choices"] for n in names[1:])]
    if bad_choices:
        i = bad_choices[0]
        example = "; ".join(f"'{n}': {by_id[n][i]['choices']}" for n in names)
        raise ValueError(f"choices differ between members for {len(bad_choices)} id(s): {_listing(bad_choices)} "
                         f"(e.g. {i!r}: {example}). Option logits must be in the manifest's canonical order; "
                         "score every member on the same manifest.")

    answers, bad_answers, unanswered = [], [], []
    for i in ids:
        given = {by_id[n][i]["answer"] for n in names} - {None}
        if len(given) > 1:
            bad_answers.append(i)
        answer = next(iter(given), None)
        if answer is not None and answer not in ref[i]["choices"]:
            raise ValueError(f"question {i!r}: answer {answer!r} is not one of its choices {ref[i]['choices']}.")
        answers.append(-1 if answer is None else ref[i]["choices"].index(answer))
        if answer is None:
            unanswered.append(i)
    if bad_answers:
        raise ValueError(f"answers differ between members for {len(bad_answers)} id(s): {_listing(bad_answers)}; "
                         "score every member on the same manifest.")
    if need_answers and unanswered:
        raise ValueError(f"fitting needs answers, but {len(unanswered)} dev question(s) have none: "
                         f"{_listing(unanswered)}. Pass dev predictions (not eval) to --dev.")

    k = max(len(ref[i]["choices"]) for i in ids)
    mask = np.zeros((len(ids), k), dtype=bool)
    logits = np.zeros((len(names), len(ids), k), dtype=np.float64)
    for j, i in enumerate(ids):
        n_opt = len(ref[i]["choices"])
        mask[j, :n_opt] = True
        for m, name in enumerate(names):
            logits[m, j, :n_opt] = by_id[name][i]["option_logits"]
    return Aligned(members=names, ids=ids, parts=[ref[i]["part"] for i in ids],
                   choices=[list(ref[i]["choices"]) for i in ids], answers=np.asarray(answers, dtype=np.int64),
                   logits=logits, mask=mask, raw_choices=[ref[i].get("raw_choices") for i in ids])


class TemperatureWeightedFusion(nn.Module):
    """sum_m softmax(v)_m * softmax(z_m / exp(log_t_m)): 2 parameters per member.

    Tensors are option-major (``[M, K, N]``): a softmax over a short innermost axis of 2-5 options is
    several times slower on CPU than one over a middle axis, vectorised along the questions.
    """

    def __init__(self, n_members: int, init_temperature: float = 1.0) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}.")
        # A log parameter keeps every temperature positive without a constraint in the optimiser.
        self.log_temperature = nn.Parameter(torch.full((n_members,), math.log(init_temperature), dtype=torch.float64))
        self.weight_logits = nn.Parameter(torch.zeros(n_members, dtype=torch.float64))

    @property
    def temperatures(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def weights(self) -> torch.Tensor:
        return self.weight_logits.softmax(0)

    def member_log_probs(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``logits [M, K, N]``, ``mask [K, N]`` -> calibrated log-probabilities ``[M, K, N]``."""
        z = logits / self.temperatures[:, None, None]
        return z.masked_fill(~mask, PAD_LOGIT).log_softmax(1)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``logits [M, K, N]``, ``mask [K, N]`` -> fused log-probabilities ``[K, N]`` (padding ~ -1e30)."""
        log_w = self.weight_logits.log_softmax(0)  # [M]
        return torch.logsumexp(log_w[:, None, None] + self.member_log_probs(logits, mask), dim=0)


@dataclass
class FitResult:
    fusion: TemperatureWeightedFusion
    losses: list[float]  # dev NLL before each step, then after the last: steps + 1 values

    @property
    def weights(self) -> list[float]:
        return self.fusion.weights.detach().tolist()

    @property
    def temperatures(self) -> list[float]:
        return self.fusion.temperatures.detach().tolist()


def _option_major(data: Aligned) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.logits [M, N, K]``, ``data.mask [N, K]`` as contiguous tensors ``[M, K, N]``, ``[K, N]``."""
    logits = torch.from_numpy(np.ascontiguousarray(data.logits.transpose(0, 2, 1)))
    return logits, torch.from_numpy(np.ascontiguousarray(data.mask.T))


def fit(data: Aligned, steps: int, lr: float, init_temperature: float = 1.0) -> FitResult:
    """Full-batch Adam on the fused dev cross-entropy; deterministic (fixed start, no sampling)."""
    if not data.has_answers:
        raise ValueError("fit needs every dev question's answer; pass dev predictions.")
    if steps < 0 or lr <= 0:
        raise ValueError(f"fit needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}; fix configs/ensemble.yaml.")
    logits, mask = _option_major(data)  # [M, K, N], [K, N]
    answers = torch.from_numpy(data.answers)[None, :]  # [1, N]
    fusion = TemperatureWeightedFusion(len(data.members), init_temperature)
    opt = torch.optim.Adam(fusion.parameters(), lr=lr)
    losses = []
    # The tensors hold ~10^4 numbers: intra-op threads cost more in hand-offs than they save (4x slower with 2
    # threads on a busy 2-core machine), so the fit runs on one thread and gives the setting back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = -fusion(logits, mask).gather(0, answers).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            losses.append(-fusion(logits, mask).gather(0, answers).mean().item())
    finally:
        torch.set_num_threads(threads)
    return FitResult(fusion=fusion, losses=losses)


def member_log_probs(data: Aligned, temperatures: list[float] | None = None) -> np.ndarray:
    """Each member's log-probabilities ``[M, N, K]`` at the given temperatures (1 for all when None)."""
    fusion = TemperatureWeightedFusion(len(data.members))
    with torch.no_grad():
        if temperatures is not None:
            fusion.log_temperature.copy_(torch.tensor(temperatures, dtype=torch.float64).log())
        return fusion.member_log_probs(*_option_major(data)).transpose(1, 2).numpy()


def fused_log_probs(data: Aligned, fusion: TemperatureWeightedFusion | None = None) -> np.ndarray:
    """Fused log-probabilities ``[N, K]``; ``fusion=None`` is the uniform average of uncalibrated members."""
    fusion = fusion or TemperatureWeightedFusion(len(data.members))
    with torch.no_grad():
        return fusion(*_option_major(data)).T.numpy()


def system_metrics(data: Aligned, log_probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Accuracy, NLL, ECE and per-part accuracy of one system's ``log_probs [N, K]`` on answered ``data``."""
    pred = np.where(data.mask, log_probs, -np.inf).argmax(-1)  # [N]
    confidence = np.exp(log_probs.max(-1, where=data.mask, initial=-np.inf))
    # by option text, as inference scores: a repeated option holding the answer's text is right too
    correct = np.array([c[int(a)] == c[int(b)] for c, a, b in zip(data.choices, pred, data.answers)])
    rows = [{"part": p, "correct": float(ok), "answer": int(b)} for p, ok, b in zip(data.parts, correct, data.answers)]
    nll = -log_probs[np.arange(len(data.ids)), data.answers]
    return {"accuracy": float(correct.mean()), "nll": float(nll.mean()),
            "ece": expected_calibration_error(confidence, correct, bins), **accuracy_by_part(rows, "correct")}


def prediction_rows(data: Aligned, log_probs: np.ndarray, model: str = "ensemble") -> list[dict[str, Any]]:
    """Rows in the predictions contract; ``option_logits`` are the fused log-probabilities ``[K_n]``."""
    rows = []
    for j, qid in enumerate(data.ids):
        k = len(data.choices[j])
        scores = [float(x) for x in log_probs[j, :k]]
        answer = data.answers[j]
        rows.append({"id": qid, "part": data.parts[j], "choices": data.choices[j], "option_logits": scores,
                     "pred": data.choices[j][int(np.argmax(scores))],
                     "answer": data.choices[j][answer] if answer >= 0 else None, "model": model})
        if data.raw_choices and data.raw_choices[j]:
            rows[-1]["raw_choices"] = data.raw_choices[j]
    return rows


def simulate_members(n_questions: int, signal: list[float], scale: list[float], seed: int = 0,
                     n_options: tuple[int, int] = (2, 5)) -> Aligned:
    """Synthetic members with a known optimum: logits ``scale_m * (signal_m * onehot(answer) + N(0, 1))``.

    Noise is independent across members, so members with signal are independent informative views;
    signal 0 is pure noise; scale > 1 makes a member overconfident by that factor. Option counts are drawn
    uniformly from ``n_options`` (inclusive), so padding and masking are exercised.
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(n_options[0], n_options[1] + 1, size=n_questions)
    k = int(counts.max())
    mask = np.arange(k)[None, :] < counts[:, None]  # [N, K]
    answers = rng.integers(0, counts)  # [N]
    onehot = np.eye(k)[answers]  # [N, K]
    noise = rng.standard_normal((len(signal), n_questions, k))
    logits = np.asarray(scale)[:, None, None] * (np.asarray(signal)[:, None, None] * onehot + noise)
    logits = np.where(mask, logits, 0.0)
    choices = [[f"option {c}" for c in range(n)] for n in counts]
    parts = [("part_a", "part_b", "part_c")[j % 3] for j in range(n_questions)]
    return Aligned(members=[f"member_{m}" for m in range(len(signal))], ids=[f"q{j:05d}" for j in range(n_questions)],
                   parts=parts, choices=choices, answers=answers.astype(np.int64), logits=logits, mask=mask)
