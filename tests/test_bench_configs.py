"""``extends:`` in config files, the bench's ``band:`` axis, and the shipped configs that use them.

The shipped bench configs refer to the recipes in ``configs/recipes/`` instead of copying them;
the files they replaced (commit e3b2a6c, written out in full below) must give the same trials
with the same trial configs, so finished bench folders stay valid.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gedi_nesy.bench.plan import BenchConfig, Trial, bench_methods, trial_config, trials
from gedi_nesy.config import JointConfig, ModelConfig, NesyRunConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.schema import _deep_merge, from_dict, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_extends_chains_and_deep_merges(tmp_path):
    _write(tmp_path, {
        "parts/c.yaml": "gedi: {w_gen: 0.0, w_inv: 0.0}\noptim: {epochs: 3}\n",
        "parts/b.yaml": "extends: c.yaml\ngedi: {w_inv: 0.5}\nname: b\n",  # relative to parts/
        "a.yaml": "extends: parts/b.yaml\ngedi: {w_prior: 0.2}\nname: a\n",
    })  # fmt: skip
    cfg = load_config(tmp_path / "a.yaml", NesyRunConfig, ["optim.epochs=4"])
    assert (cfg.gedi.w_gen, cfg.gedi.w_inv, cfg.gedi.w_prior) == (0.0, 0.5, 0.2)
    assert (cfg.name, cfg.optim.epochs) == ("a", 4)  # this file wins, then the overrides


def test_extends_inside_a_bench_method_is_relative_to_the_bench_file(tmp_path):
    _write(tmp_path, {
        "recipes/g.yaml": "gedi: {w_inv: 0.05, w_prior: 0.5}\noptim: {gedi_only_steps: 150}\n",
        "b.yaml": "base: {task: {name: mnist_half}}\nmethods:\n"
                  "  m: {extends: recipes/g.yaml, gedi.w_inv: 0.1, optim: {epochs: 2}}\n",
    })  # fmt: skip
    cfg = load_config(tmp_path / "b.yaml", BenchConfig)
    raw = trial_config(cfg, Trial("m", None, 0))
    assert raw["gedi"] == {"w_inv": 0.1, "w_prior": 0.5}  # the method's own key wins
    assert raw["optim"] == {"gedi_only_steps": 150, "epochs": 2, "seed": 0}


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"},
         r"config file .*b.yaml: extends makes a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"),
        ({"a.yaml": "methods: {m: {extends: a.yaml}}\n"}, r"a.yaml: extends makes a cycle"),
        ({"a.yaml": "extends: gone.yaml\n"},
         r"config file .*gone.yaml \(extended by .*a.yaml\) does not exist; fix the extends"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "- 1\n"},
         r"file .*b.yaml \(extended by .*a.yaml\) must hold a mapping of sections, got list"),
        ({"a.yaml": "extends: [b.yaml]\n"}, r"a.yaml: extends = \['b.yaml'\]; give one YAML file"),
    ],
)  # fmt: skip
def test_bad_extends_is_a_one_line_error_naming_the_files(tmp_path, files, message):
    _write(tmp_path, files)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(tmp_path / "a.yaml", BenchConfig)
    assert "\n" not in str(err.value)


def _band_bench(tmp_path, **band) -> BenchConfig:
    return from_dict(BenchConfig, {
        "out_dir": str(tmp_path), "seeds": [0],
        "base": {"task": {"name": "mnist_half"}, "gedi": {"w_gen": 0.0, "w_inv": 0.0}},
        "methods": {"g": {"gedi.w_gen": 0.1, "gedi.w_inv": 0.05, "sgld": {"n_steps": 5}},
                    "h": {"gedi.w_inv": 0.2}},
        "band": band,
    })  # fmt: skip


def test_band_scales_one_key_of_a_method_at_a_time(tmp_path):
    cfg = _band_bench(tmp_path, methods=["g"], keys=["gedi.w_gen", "gedi.w_prior"])
    assert [t.name for t in trials(cfg)] == [
        "w_gen_x0.5-s0", "w_gen_x2-s0", "w_prior_x0.5-s0", "w_prior_x2-s0",
    ]  # fmt: skip
    methods = bench_methods(cfg)
    assert methods["w_gen_x0.5"] == {"gedi.w_gen": 0.05, "gedi.w_inv": 0.05, "sgld.n_steps": 5}
    assert methods["w_prior_x2"]["gedi.w_prior"] == 0.2  # the default (0.1), doubled
    steps = _band_bench(tmp_path, methods=["g"], keys=["sgld.n_steps"])
    assert bench_methods(steps)["n_steps_x2"]["sgld.n_steps"] == 10  # an int setting stays int
    with pytest.raises(ConfigError, match="trial n_steps_x0.5-s0: config key sgld.n_steps = 2.5"):
        trials(steps)
    two = _band_bench(tmp_path, methods=["g", "h"], keys=["gedi.w_inv"], factors=[2])
    assert [t.name for t in trials(two)] == ["g@w_inv_x2-s0", "h@w_inv_x2-s0"]
    assert bench_methods(two)["h@w_inv_x2"] == {"gedi.w_inv": 0.4}


@pytest.mark.parametrize(
    "band, message",
    [
        ({"methods": ["x"]}, r"band.methods = \['x'\]: name one or more of the bench's methods"),
        ({"methods": ["g"], "keys": ["gedi.w_gen", "sgld.w_gen"]}, "distinct last parts"),
        ({"methods": ["g"], "factors": [1, 2]}, "distinct positive factors other than 1"),
        ({"methods": ["h"], "keys": ["gedi.w_gen"]}, "gedi.w_gen = 0.0 in method h: a band"),
        ({"methods": ["g"], "keys": ["gedi.nope"]}, "'gedi.nope' is not a run-config setting"),
    ],
)
def test_bad_bands_are_refused(tmp_path, band, message):
    with pytest.raises(ConfigError, match=message):
        trials(_band_bench(tmp_path, **band))


# The files the shipped configs replaced, as they were at commit e3b2a6c (comments left out).
HALF_OVERCLUSTER_BAND = """
name: bench_half_overcluster_band
out_dir: runs/bench
seeds: [0, 1, 2, 3, 4]
base:
  task: {name: mnist_half}
  model: {clusters_per_value: 2}
  gedi: {w_gen: 0.1, energy_reg: 0.01, w_inv: 0.05, w_prior: 0.5}
  sgld: {n_steps: 5}
  optim: {epochs: 10, batch_size: 64, gedi_only_steps: 150, relabel_every: 46}
  logic: {cache_dir: runs/bench/circuits}
methods:
  w_gen_x0.5: {gedi.w_gen: 0.05}
  w_gen_x2: {gedi.w_gen: 0.2}
  w_inv_x0.5: {gedi.w_inv: 0.025}
  w_inv_x2: {gedi.w_inv: 0.1}
  w_prior_x0.5: {gedi.w_prior: 0.25}
  w_prior_x2: {gedi.w_prior: 1.0}
"""
EVENODD = """
name: bench_evenodd
out_dir: runs/bench
seeds: [0, 1, 2, 3, 4]
base:
  task: {name: mnist_evenodd}
  gedi: {w_gen: 0.0, w_inv: 0.0, w_prior: 0.0}
  optim: {epochs: 10, batch_size: 64}
  logic: {cache_dir: runs/bench/circuits}
methods:
  dpl+gedi: {gedi.w_gen: 0.1, gedi.energy_reg: 0.01, gedi.w_inv: 0.05, gedi.w_prior: 0.5,
             optim.gedi_only_steps: 150, sgld.n_steps: 5}
  dpl+gedi-nogen: {gedi.w_inv: 0.05, gedi.w_prior: 0.5, optim.gedi_only_steps: 150}
  dpl+swav: {gedi.method: swav, gedi.w_inv: 0.5, optim.gedi_only_steps: 150}
  dpl: {}
  dpl+entropy: {gedi.w_marginal_entropy: 1.0}
  dpl+1label: {supervision.labels_per_class: 1}
"""
HALF = EVENODD.replace("bench_evenodd", "bench_half").replace("mnist_evenodd", "mnist_half")
EVENODD_1LABEL = """
name: bench_evenodd_1label
out_dir: runs/bench
seeds: [0, 1, 2, 3, 4]
base:
  task: {name: mnist_evenodd}
  gedi: {w_gen: 0.0, w_inv: 0.0, w_prior: 0.0}
  optim: {epochs: 10, batch_size: 64}
  logic: {cache_dir: runs/bench/circuits}
  supervision: {labels_per_class: 1, augment: true}
methods:
  dpl+gedi-nogen+1label: {gedi.w_inv: 0.05, gedi.w_prior: 0.5, optim.gedi_only_steps: 150}
  dpl+1label: {}
"""
HALF_OVERCLUSTER = """
name: bench_half_overcluster
out_dir: runs/bench
seeds: [0, 1, 2, 3, 4]
base:
  task: {name: mnist_half}
  model: {clusters_per_value: 2}
  gedi: {w_gen: 0.0, w_inv: 0.05, w_prior: 0.5}
  optim: {epochs: 10, batch_size: 64, gedi_only_steps: 150, relabel_every: 46}
  logic: {cache_dir: runs/bench/circuits}
methods:
  dpl+gedi+oc: {gedi.w_gen: 0.1, gedi.energy_reg: 0.01, sgld.n_steps: 5}
  dpl+gedi-nogen+oc: {}
"""
EVENODD_RELABEL = """
name: bench_evenodd_relabel
out_dir: runs/bench
seeds: [0, 1, 2, 3, 4]
restarts: 3
select_by: train_min_usage_c
base:
  task: {name: mnist_evenodd}
  gedi: {w_gen: 0.0, w_inv: 0.0, w_prior: 0.0}
  optim: {epochs: 10, batch_size: 64}
  logic: {cache_dir: runs/bench/circuits}
methods:
  dpl+gedi-nogen+relabel: {gedi.w_inv: 0.05, gedi.w_prior: 0.5, gedi.clean_view: true,
                           optim.gedi_only_steps: 150, optim.relabel_every: 105}
"""
ADDITION_SMALL = """
name: bench_addition_small
out_dir: runs/bench
seeds: [0, 1, 2]
size_key: task.n_train
sizes: [100, 300, 1000]
base:
  task: {name: mnist_addition, n_digits: 1, n_val: 200, n_test: 1000, n_unlabelled: 5000}
  gedi: {w_gen: 0.0, w_inv: 0.0, w_prior: 0.0}
  optim: {epochs: 1000, max_steps: 750, batch_size: 16, eval_every: 75}
  logic: {cache_dir: runs/bench/circuits}
methods:
  dpl: {}
  dpl+entropy: {gedi.w_marginal_entropy: 1.0}
  dpl+1label: {supervision.labels_per_class: 1}
  dpl+gedi: {gedi.w_gen: 0.1, gedi.energy_reg: 0.01, gedi.w_inv: 0.1, gedi.w_prior: 0.1,
             optim.extra_images: 32}
  dpl+gedi-nogen: {gedi.w_inv: 0.1, gedi.w_prior: 0.1, optim.extra_images: 32}
  dpl+swav: {gedi.method: swav, gedi.w_inv: 0.1, optim.extra_images: 32}
"""


# The library's defaults when the files above were written (until 2026-12-02): the shipped
# benches pin what they relied on, so their trials are the same runs under today's defaults.
OLD_DEFAULTS = {
    "model": {"norm": "none"},
    "gedi": {"w_gen": 1.0, "w_inv": 1.0, "w_prior": 1.0, "energy_reg": 0.0},
}


ADDED_SINCE = {"bench_addition_small": {"dpl+gedi-strong"}}  # 2026-12-03, issue 18


def _resolved(raw: dict, defaults: dict | None = None) -> dict:
    """A trial's run config with every setting spelt out, under ``defaults`` where given."""
    return to_dict(from_dict(NesyRunConfig, _deep_merge(defaults or {}, raw)))


@pytest.mark.parametrize(
    "name, before",
    [
        ("bench_half", HALF),  # methods that extend recipes, a base from shortcut_bench.yaml
        ("bench_half_overcluster", HALF_OVERCLUSTER),
        ("bench_half_overcluster_band", HALF_OVERCLUSTER_BAND),  # extends a bench, band axis
        ("bench_evenodd", EVENODD),  # extends bench_half.yaml
        ("bench_evenodd_1label", EVENODD_1LABEL),  # a base that extends a recipe
        ("bench_evenodd_relabel", EVENODD_RELABEL),  # a recipe plus the method's own keys
        ("bench_addition_small", ADDITION_SMALL),  # a size axis, the addition recipes
    ],
)
def test_shipped_benches_give_the_trials_of_the_files_they_replaced(tmp_path, name, before):
    (tmp_path / f"{name}.yaml").write_text(before)
    old = load_config(tmp_path / f"{name}.yaml", BenchConfig)
    new = load_config(CONFIGS / f"{name}.yaml", BenchConfig)
    assert new.name == old.name and new.out_dir == old.out_dir  # the same bench folder
    added = ADDED_SINCE.get(name, set())  # methods added later: their own rows
    assert [t.name for t in trials(new) if t.method not in added] == [t.name for t in trials(old)]
    for trial in trials(old):
        then = _resolved(trial_config(old, trial), OLD_DEFAULTS)
        assert _resolved(trial_config(new, trial)) == then, trial.name


def test_the_main_job_is_the_full_objective_on_the_default_network():
    """Since 2026-12-02 the main job is recipes/addition_gedi.yaml (L_GEN on) at the library's
    defaults: its GEDI weights and network are what ``JointConfig()`` and ``GEDINet(k)`` use."""
    expected = {
        "name": "mnist_addition",
        "task": {"name": "mnist_addition", "n_digits": 1, "n_train": 300, "n_val": 200,
                 "n_unlabelled": 5000},
        "gedi": {"w_gen": 0.1, "energy_reg": 0.01, "w_inv": 0.1, "w_prior": 0.1},
        "optim": {"epochs": 40, "batch_size": 16, "extra_images": 32},
    }  # fmt: skip
    now = load_config(CONFIGS / "mnist_addition.yaml", NesyRunConfig)
    assert to_dict(now) == to_dict(from_dict(NesyRunConfig, expected))
    assert now.gedi == JointConfig().gedi and now.model == ModelConfig(k=now.model.k)
    assert now.model.norm == "group"


RESULT_CONFIGS = [
    p for p in sorted(CONFIGS.rglob("*.yaml"))
    if p.name not in {"gedi_mnist.yaml", "smoke.yaml", "smoke_train.yaml"}  # runs, not recipes
]  # fmt: skip


@pytest.mark.parametrize("path", RESULT_CONFIGS, ids=lambda p: p.name)
def test_every_recipe_and_bench_says_what_it_is_for_and_whether_it_is_current(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#").strip())
    assert header, f"{path.name}: start with a comment saying what it is for"
    assert "Status: current" in " ".join(header), f"{path.name}: say whether it is current"


BASELINES = ["dpl", "dpl+entropy", "dpl+swav", "dpl+1label"]
FROZEN = [  # (evaluation file, development bench whose method it freezes, method)
    ("eval/half.yaml", "bench_half_overcluster.yaml", "dpl+gedi+oc"),
    *[("eval/half.yaml", "bench_half.yaml", m) for m in BASELINES],
    ("eval/evenodd.yaml", "bench_evenodd_relabel.yaml", "dpl+gedi-nogen+relabel"),
    ("eval/evenodd_restarts.yaml", "bench_evenodd_relabel.yaml", "dpl+gedi-nogen+relabel"),
    *[("eval/evenodd.yaml", "bench_evenodd.yaml", m) for m in BASELINES],
    *[
        ("eval/addition.yaml", "bench_addition_small.yaml", m)
        for m in ["dpl+gedi-strong", *BASELINES]
    ],
]


@pytest.mark.parametrize("evaluation, development, method", FROZEN)
def test_an_evaluation_recipe_is_the_one_chosen_on_the_development_seeds(
    evaluation, development, method
):
    """docs/protocol.md: the evaluation benches run the development benches' settings, on the
    seeds 100-109 and in their own folders; restart rows keep the development restart count."""
    frozen = load_config(CONFIGS / evaluation, BenchConfig)
    chosen = load_config(CONFIGS / development, BenchConfig)
    assert frozen.seeds == list(range(100, 110))
    assert frozen.name == "eval_" + Path(evaluation).stem and frozen.out_dir == chosen.out_dir
    if frozen.restarts > 1:  # a restart row; a single-run row runs restart 0 of the recipe
        assert (frozen.restarts, frozen.select_by) == (chosen.restarts, chosen.select_by)
    assert len(trials(frozen)) == len(frozen.methods) * 10 * frozen.restarts * len(
        frozen.sizes or [1]
    )
    for seed in (100, 109):
        for restart in range(frozen.restarts):
            trial = Trial(method, frozen.sizes[0] if frozen.sizes else None, seed, restart)
            run, dev = trial_config(frozen, trial), trial_config(chosen, trial)
            assert run.pop("out_dir") != dev.pop("out_dir")  # each bench its own folder
            assert _resolved(run) == _resolved(dev), trial.name


@pytest.mark.parametrize("method, n", [("n4", 4), ("n15", 15), ("n100", 100)])
def test_the_long_addition_bench_runs_the_shipped_configs(method, n):
    """configs/eval/long_addition.yaml (issue 17): each method is configs/mnist_additionN.yaml,
    on three evaluation seeds, in the bench's own folder and circuit cache."""
    bench = load_config(CONFIGS / "eval/long_addition.yaml", BenchConfig)
    assert bench.seeds == [100, 101, 102] and bench.name == "eval_long_addition"
    run = _resolved(trial_config(bench, Trial(method, None, 101, 0)))
    shipped = to_dict(load_config(CONFIGS / f"mnist_addition{n}.yaml", NesyRunConfig))
    trial = {"name": f"{method}-s101", "out_dir": "runs/bench/eval_long_addition/trials",
             "task": {"seed": 101}, "optim": {"seed": 101},
             "logic": {"cache_dir": "runs/bench/circuits"}}  # fmt: skip
    assert run == _deep_merge(shipped, trial)


@pytest.mark.parametrize("method, n", [("n15", 15), ("n100", 100)])
def test_the_long_addition_restart_bench_runs_the_shipped_configs_twice(method, n):
    """configs/eval/long_addition_restarts.yaml (issue 17): each method is
    configs/mnist_additionN.yaml on the fresh evaluation seeds 103-105, twice per seed (restart 1
    changes the model seed only), the run kept by its training sum accuracy (no concept labels)."""
    bench = load_config(CONFIGS / "eval/long_addition_restarts.yaml", BenchConfig)
    assert bench.seeds == [103, 104, 105] and bench.name == "eval_long_addition_restarts"
    assert (bench.restarts, bench.select_by) == (2, "train_task_acc")
    assert [t.name for t in trials(bench) if t.method == method] == [
        f"{method}-s{seed}{restart}" for seed in (103, 104, 105) for restart in ("", "-r1")
    ]
    shipped = to_dict(load_config(CONFIGS / f"mnist_addition{n}.yaml", NesyRunConfig))
    for restart, model_seed in ((0, 104), (1, 1104)):
        run = _resolved(trial_config(bench, Trial(method, None, 104, restart)))
        name = f"{method}-s104" + ("-r1" if restart else "")
        trial = {"name": name, "out_dir": "runs/bench/eval_long_addition_restarts/trials",
                 "task": {"seed": 104}, "optim": {"seed": model_seed},
                 "logic": {"cache_dir": "runs/bench/circuits"}}  # fmt: skip
        assert run == _deep_merge(shipped, trial)
