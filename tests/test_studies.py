"""Every study runs end to end on a tiny grid, on full-MNIST-format IDX files (``--data-dir``), and writes
its section with computed verdicts; the pieces the sections rest on, checked by hand."""

import json
from pathlib import Path

import numpy as np
import pytest

from backforward.experiments.arms import arm, longest_first, plan, run_name
from backforward.experiments.cli import build_parser
from backforward.experiments.report import (
    EQUIVALENT,
    FAILS,
    HOLDS,
    SMALL,
    TRAIN_LOSS,
    UNSURE,
    VERDICTS,
    Claim,
    Evidence,
)
from backforward.experiments.reproduce import ReproduceConfig, reproduce
from backforward.experiments.studies import (
    FULL,
    STUDIES,
    StudyConfig,
    advantage,
    at_budget,
    best_lr,
    control_answer,
    equal_budget,
    ics_per_epoch,
    order_pattern,
    pair,
    plan_cost,
    plan_depth,
    plan_order,
    run_study,
    trained,
    tuning_arm,
)
from backforward.experiments.toy import ToyConfig
from backforward.experiments.train import TrainConfig

TINY = StudyConfig(seeds=2, epochs=2, lrs=(0.1,), depths=(1, 2), hidden=8, control_depths=(1,), multipliers=(1.0, 1.5),
                   lr_grid=(0.05, 0.1), tuning_seeds=1, dln_depth=3, dln_hidden=8, dln_lr=0.05, order_depths=(2,),
                   res_blocks=1, switch_epoch=1, finetune_epochs=1, cost_depths=(1, 2))


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_learnable_mnist(folder: Path, n_train: int = 512, n_val: int = 128) -> Path:
    """IDX files whose digit c is noise with a bright 7x7 patch at a place that depends on c: learnable in steps."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            row, col = divmod(int(c), 4)
            images[i, 7 * row:7 * row + 7, 7 * col:7 * col + 7] = 255
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return folder


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_learnable_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, idx_dir):
    out = tmp_path_factory.mktemp("studies")
    reproduce(out, jobs=1, data_dir=str(idx_dir), cfg=ReproduceConfig(seeds=2, epochs=2, toy=ToyConfig(seeds=3),
                                                                       hidden=8))
    for name in STUDIES:
        run_study(name, out, jobs=1, data_dir=str(idx_dir), cfg=TINY)
    return out


def verdict_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]


@pytest.mark.parametrize("name", list(STUDIES))
def test_study_section_has_verdicts_and_figures(report_dir, name):
    text = (report_dir / "sections" / f"{name}.md").read_text()
    rows = verdict_rows(text)
    assert rows and all(any(f"**{v}" in row for v in VERDICTS) for row in rows)
    assert f"Family: the {len(rows)} verdict rows of this section" in text
    assert "**Answer (computed from the verdicts above):**" in text
    figures = [part.split(")")[0] for part in text.split("](")[1:]]
    assert f"{name.replace('-', '_')}_effects.png" in figures
    for figure in figures:
        assert (report_dir / figure).read_bytes()[:4] == b"\x89PNG"


def test_everything_ran_on_the_idx_files(report_dir, idx_dir):
    configs = [json.loads(p.read_text()) for p in (report_dir / "runs").glob("*/config.json")]
    assert configs and all(c["data_dir"] == str(idx_dir) for c in configs)
    assert f"Data: IDX files in {idx_dir}" in (report_dir / "sections" / "reproduce.md").read_text()
    assert json.loads((report_dir / "toy.json").read_text())["data"] == f"IDX files in {idx_dir}"


def test_report_collects_every_section_in_order(report_dir):
    text = (report_dir / "REPORT.md").read_text()
    titles = ("Reproducing the paper", "Study: is the gain a larger effective step?", "Study: depth",
              "Study: BatchNorm", "Study: update order", "Study: beyond the MLP", "Study: beyond SGD",
              "Study: warm-up", "Study: cost")
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    assert text.index("Minimum effects of interest") < positions[0]


def test_studies_are_on_the_command_line(tmp_path):
    parser = build_parser()
    for name in [*STUDIES, "all"]:
        args = parser.parse_args(["study", name, "--quick", "--data-dir", str(tmp_path)])
        assert args.name == name and args.data_dir == str(tmp_path)


def test_run_names_are_computed_from_the_settings():
    config = TrainConfig(method="backforward", lr=0.05, epochs=20, depth=2, track_ics=True, ics_every=4, seed=3)
    assert run_name(config) == "backforward-lr0.05-e20-depth=2-track_ics-ics_every=4-s3"
    tuned = TrainConfig(init_from="/x/runs/sgd-lr0.05-e20-s0")
    assert run_name(tuned) == "sgd-lr0.05-e30-init_from=sgd-lr0.05-e20-s0-s0"
    twice = [arm(2, lr=0.1), arm(2, lr=0.1), arm(1, lr=0.2)]
    assert [r.name for r in plan(twice)] == ["sgd-lr0.1-e30-s0", "sgd-lr0.1-e30-s1", "sgd-lr0.2-e30-s0"]


def test_studies_share_runs(tmp_path):
    depth = {r.name for r in plan(plan_depth(FULL, tmp_path, {}))}
    cost = {r.name for r in plan(plan_cost(FULL, tmp_path, {}))}
    order = {r.name for r in plan(plan_order(FULL, tmp_path, {}))}
    assert cost <= depth  # the cost study needs nothing the depth study did not run
    assert len(order - depth) == len(order) // 3  # only the reverse-order arms are the order study's own


def test_lr_control_tunes_both_methods_then_compares_on_other_seeds(report_dir):
    assert tuning_arm(TINY, "sgd", 0.1, 1).seeds == (100,)
    # Folders are named RUN-IDENTITY: the run name, then the hash of its settings.
    folders = {p.name.rsplit("-", 1)[0]: p for p in (report_dir / "runs").iterdir()}
    names = set(folders)
    for method in ("sgd", "backforward"):
        for lr in TINY.lr_grid:
            assert all(r.name in names for r in tuning_arm(TINY, method, lr, 1).runs())
    metrics = {n: [json.loads(line) for line in (folders[n] / "metrics.jsonl").read_text().splitlines()]
               for n in names}
    for method in ("sgd", "backforward"):
        best = best_lr(TINY, metrics, method, 1)
        assert best in TINY.lr_grid
        sgd_or_bf = pair(TINY, best, 1)[method == "backforward"]
        assert all(r.name in names for r in sgd_or_bf.runs())  # the tuned arm ran on the compared seeds 0, 1


def test_best_lr_by_hand():
    cfg = StudyConfig(seeds=1, epochs=1, lr_grid=(0.1, 0.2, 0.4), tuning_seeds=2)
    metrics = {}
    for lr, accs, losses in ((0.1, (1.0, 0.5), (0.5, 0.5)), (0.2, (0.75, 0.75), (0.25, 0.25)),
                             (0.4, (0.5, 0.5), (0.1, 0.1))):
        for run, acc, loss in zip(tuning_arm(cfg, "sgd", lr, 1).runs(), accs, losses, strict=True):
            metrics[run.name] = [{"val_acc": acc, "val_loss": loss}]
    # mean accuracy 0.75 at lr 0.1 and at 0.2 (0.5 at 0.4): a tie, broken by the lower validation loss
    assert best_lr(cfg, metrics, "sgd", 1) == 0.2
    assert best_lr(cfg, {}, "sgd", 1) is None  # tuning runs not there yet


def test_ics_is_averaged_over_linear_stages_2_to_n_only():
    # An MLP with BatchNorm, 2 hidden layers: Linear stages "0", "3", "6"; BatchNorm stages "1", "4".
    bn = arm(1, depth=2, batchnorm=True, track_ics=True)
    record = {"ics": {"0": {"rel_shift": 0.0, "grad_cosine": 1.0}, "1": {"rel_shift": 9.0, "grad_cosine": -1.0},
                      "3": {"rel_shift": 0.2, "grad_cosine": 0.9}, "4": {"rel_shift": 9.0, "grad_cosine": -1.0},
                      "6": {"rel_shift": 0.4, "grad_cosine": 0.7}}}
    assert ics_per_epoch([record], bn, "rel_shift") == pytest.approx([0.3])
    assert ics_per_epoch([record], bn, "angle") == pytest.approx([0.2])  # 1 − (0.9 + 0.7)/2


def test_advantage_and_trained_by_hand():
    sgd = [[{"train_loss": 2.0}, {"train_loss": 1.0}]]
    bf = [[{"train_loss": 1.5}, {"train_loss": 0.75}]]
    assert advantage(sgd, bf, 2) == pytest.approx([0.25])  # (1.5 - 1.125) / 1.5
    assert trained(sgd, 2)
    assert not trained([[{"train_loss": 2.3}]], 1)          # above 99% of ln 10 = 2.2796
    assert not trained([[{"train_loss": 0.1}]], 2)          # stopped after 1 of 2 epochs: diverged


def _decided(verdict):
    return Claim("c", TRAIN_LOSS, "", "", Evidence(0, 0, 0, 1, 1, 5), -1, 1.0, 5, 5, verdict=verdict)


@pytest.mark.parametrize("forward, reverse, versus, start", [
    (HOLDS, FAILS, HOLDS, "consistent with removing ICS"),
    (SMALL, UNSURE, SMALL, "consistent with removing ICS"),
    (HOLDS, HOLDS, HOLDS, "both orders beat SGD: reverse, which keeps ICS, gains too"),
    (EQUIVALENT, FAILS, HOLDS, "forward does not beat SGD"),
    (HOLDS, UNSURE, UNSURE, "forward beats SGD, but not reverse"),
])
def test_order_answer_is_no_stronger_than_the_control(forward, reverse, versus, start):
    text = order_pattern(_decided(forward), _decided(reverse), _decided(versus))
    assert text.startswith(start)
    assert "comes from removing ICS" not in text


def test_order_section_never_claims_more_than_consistency(report_dir):
    text = (report_dir / "sections" / "order.md").read_text()
    assert "the gain comes from removing ICS" not in text.replace("*consistent with* the gain coming", "")


def test_fine_tuning_starts_from_the_sgd_model(report_dir):
    sgd = pair(TINY)[0]
    folders = list((report_dir / "runs").glob("*-from-*"))
    assert len(folders) == 2 * TINY.seeds
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        source = Path(config["init_from"])
        assert source.parent == (report_dir / "runs").resolve()
        assert source.name.startswith(sgd.run(config["seed"]).name + "-")  # that seed's SGD run, in its folder
        assert json.loads((source / "config.json").read_text())["method"] == "sgd"


def test_equal_budget_by_hand():
    sgd = [[{"flops": 10, "train_loss": 1.0}, {"flops": 20, "train_loss": 0.5}]]
    bf = [[{"flops": 15, "train_loss": 0.8}, {"flops": 30, "train_loss": 0.3}]]
    # budget = min(20, 30) = 20: SGD finished both epochs (0.5), Backforward only its first (0.8).
    assert equal_budget(sgd, bf, "flops") == ([0.5], [0.8])
    assert at_budget(bf[0], 14, "flops") != at_budget(bf[0], 14, "flops")  # nothing within budget: NaN


def test_depth_section_lists_untrained_settings_and_the_deepest_that_trained(report_dir):
    text = (report_dir / "sections" / "depth.md").read_text()
    assert "**Not trained**" in text
    assert f"Settings where both methods trained at {max(TINY.depths)} hidden layers:" in text
    assert "ICS on SGD's trajectory predicts Backforward's advantage" in text


def test_batchnorm_section_tests_early_and_late_on_both_networks(report_dir):
    text = (report_dir / "sections" / "batchnorm.md").read_text()
    for net in ("MLP (2 hidden layers)", f"deep linear network ({TINY.dln_depth + 1} layers)"):
        for when in ("in epoch 1", "in the last epoch"):
            for tag in ("‖G − G'‖/‖G‖", "1 − cos"):
                assert sum(1 for row in verdict_rows(text)
                           if row.startswith(f"| {net}: BatchNorm reduces ICS ({tag}) {when}")) == 1


def test_long_runs_start_first():
    runs = plan([arm(1, depth=1), arm(1, method="backforward", depth=8), arm(1, depth=8, track_ics=True)])
    assert [r.config.depth for r in longest_first(runs)] == [8, 8, 1]
    assert longest_first(runs)[0].config.method == "backforward"


@pytest.mark.parametrize("same, larger, phrase", [
    (HOLDS, FAILS, "SGD converges faster than Backforward: the gain is smaller than what that step buys"),
    (SMALL, EQUIVALENT, "the two are equivalent"),
    (HOLDS, UNSURE, "the comparison is inconclusive"),
    (EQUIVALENT, FAILS, "does not converge faster than SGD at the same lr (equivalent)"),
    (HOLDS, HOLDS, "even with a 1.5× larger step"),
])
def test_lr_control_answer_follows_the_verdicts(same, larger, phrase):
    cfg = StudyConfig(multipliers=(1.0, 1.5))
    text = control_answer(1, cfg, [_decided(same), _decided(larger)], [_decided(UNSURE), _decided(HOLDS)])
    assert phrase in text
    assert text.endswith("'Backforward performs better' is inconclusive and 'converges faster' is holds.")
