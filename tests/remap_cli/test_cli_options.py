"""Every option that `remap <command> --help` shows reaches the code that uses it, through the
console entry point (`remap_cli.main`).

The options are read from the parsers themselves, built as `remap_cli.main` builds them
(subcommands and their steps included), so an option added to a parser is tested without
touching this file, and one that the console parses but does not pass on fails here. For each
option the command runs with the library function it calls replaced by a recorder, once with
only the arguments it needs and once with that option set to a value other than its default:

- `remap embed` hands its arguments to `pipelines.embed.run(argv)`, `remap index-beam` to
  `pipelines.index_build.run(argv)`; the option must come out of Beam's own parse of that argv
  (`PipelineOptions(argv)`: EmbedOptions, EmbedWorkerOptions, IndexBuildOptions).
- `remap index` (and its steps), `remap search`, `remap samples`: what the library functions
  receive (bound to their signatures), or what the command prints, must change, and carry the
  value given where the option takes one.
- `remap eval` and `remap train` hand an options dataclass to their library function
  (`evaluate.run(EvalOptions)`, `run.run_training(TrainRun)`): the value must be in its field
  of that name, and the library module must read `options.<field>`; an option the console
  itself acts on (eval's --format, --output) must be read from `args` by the console module.

The sample values are generic (by type, choices, action); `SAMPLES` holds the few that must be
real (a file to load), `CONTEXT` the other options an option acts with. An option with neither
a generic nor a listed sample fails with a message saying where to add one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

import remap_cli as cli

# Options whose value must be something real: (command, dest) -> function(tmp_path) -> value.
SAMPLES = {
    ("search", "vectors"): lambda tmp: _npy(tmp / "queries.npy"),
    ("search", "html"): lambda tmp: str(tmp / "results.html"),
    ("search", "filter"): lambda tmp: ["colour=red"],
    ("export", "scales"): lambda tmp: "sqrt(2),1,1/2",
}
# What the code should see where it is not the value given: (command, dest) -> value.
EXPECTED = {
    ("search", "filter"): ["red"],           # --filter colour=red -> filters {"colour": ["red"]}
    ("export", "scales"): [2 ** 0.5, 1.0, 0.5],
}
# Options that act only together with others: (command, dest) -> {dest: tokens} set as well
# (in the run without the option too).
CONTEXT = {
    ("index", "staging"): {"output": ["--output", "memory://remap-cli-options/index"]},
}
# Options that stand instead of others: (command, dest) -> dests left out when it is given.
REPLACES = {
    ("search", "vectors"): ("images",),   # query vectors or query images, not both
}
# Arguments a command needs before it calls anything, beyond argparse's required ones.
NEEDS = {
    ("index",): {"embeddings": ["--embeddings", "base-store"], "output": ["--output", "base-idx"]},
    ("search",): {"images": ["base-query.jpg"]},
}


def _npy(path: Path) -> str:
    np.save(path, np.eye(2, 4, dtype=np.float32))
    return str(path)


# --------------------------------------------------------------------------- the parsers

def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `remap <name>`, built as remap_cli.main builds it."""
    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"remap {name}", description=cli.COMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def shown_arguments(parser: argparse.ArgumentParser, path: tuple = ()):
    """(step path, action) of every argument the parser's --help shows, steps included."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            for step, sub in action.choices.items():
                yield from shown_arguments(sub, (*path, step))
            continue
        yield path, action


def _cases():
    cases = []
    for name in cli.COMMANDS:
        for path, action in shown_arguments(command_parser(name)):
            flag = action.option_strings[-1] if action.option_strings else action.dest
            cases.append(pytest.param(name, path, action.dest,
                                      id=" ".join((name, *path, flag))))
    return cases


def _find(name: str, path: tuple, dest: str) -> argparse.Action:
    for p, action in shown_arguments(command_parser(name)):
        if p == path and action.dest == dest:
            return action
    raise AssertionError(f"remap {name} {' '.join(path)} has no --{dest}")


def _tokens(action: argparse.Action, value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not action.option_strings:
        return [str(v) for v in values]
    return [t for v in values for t in (action.option_strings[-1], str(v))]


def sample(name: str, action: argparse.Action, tmp_path: Path) -> tuple[list[str], object]:
    """(command-line tokens, the value the code should see) of a non-default value."""
    opt = action.option_strings[-1] if action.option_strings else action.dest
    if (name, action.dest) in SAMPLES:
        value = SAMPLES[(name, action.dest)](tmp_path)
        return _tokens(action, value), EXPECTED.get((name, action.dest), value)
    if isinstance(action, argparse._StoreTrueAction):
        return [opt], True
    if isinstance(action, argparse._StoreFalseAction):
        return [opt], False
    if action.choices:
        value = next(c for c in action.choices if c != action.default)
    elif action.type is int:
        value = action.default + 3 if isinstance(action.default, int) else 7
    elif action.type is float:
        if isinstance(action.default, (int, float)) and 0 < action.default <= 1:
            value = action.default / 2          # shares and recalls stay in (0, 1]
        else:
            value = action.default * 2 + 0.5 if isinstance(action.default, (int, float)) else 0.25
    elif action.type in (None, str) and action.dest.endswith("_memory"):
        value = "123MB"                         # memory budgets are sizes
    elif action.type in (None, str):
        value = f"probe-{action.dest}"
    else:
        raise AssertionError(
            f"remap {name}: no sample value for {opt} (type {action.type!r}): add one to SAMPLES "
            f"in {__file__}")
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return _tokens(action, [value]), [value]
    if type(action) is not argparse._StoreAction or action.nargs not in (None, "?"):
        raise AssertionError(f"remap {name}: {opt} is a {type(action).__name__} with nargs "
                             f"{action.nargs!r}: add a sample to SAMPLES in {__file__}")
    return _tokens(action, value), value


def base_arguments(name: str, path: tuple) -> dict[str, list[str]]:
    """dest -> tokens of what the command needs to run: argparse's required arguments (with
    values of their own) and NEEDS."""
    args = {}
    for p, action in shown_arguments(command_parser(name)):
        if p == path and action.required:
            args[action.dest] = _tokens(action, f"base-{action.dest}")
    return {**args, **NEEDS.get((name, *path), {})}


def command_line(name: str, path: tuple, args: dict[str, list[str]]) -> list[str]:
    """Options first, positionals last."""
    parser_actions = {a.dest: a for p, a in shown_arguments(command_parser(name)) if p == path}
    options = [t for d, ts in args.items() if parser_actions[d].option_strings for t in ts]
    positional = [t for d, ts in args.items() if not parser_actions[d].option_strings
                  for t in ts]
    return [name, *path, *options, *positional]


# --------------------------------------------------------------------------- recorders

class Recorder:
    """Replaces library functions by recorders of the arguments they are called with, bound to
    the real function's signature; observation() flattens the calls (+ what was printed)."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.calls = monkeypatch, []

    def replace(self, owner, attr: str, returns=None):
        real = getattr(owner, attr)
        signature = inspect.signature(real)

        def recorder(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append((attr, dict(bound.arguments)))
            return returns(*args, **kwargs) if callable(returns) else returns

        self.monkeypatch.setattr(owner, attr, recorder)

    def observation(self, printed: str) -> dict:
        flat = {"printed": printed}
        for i, (fn, arguments) in enumerate(self.calls):
            _flatten(flat, (i, fn), arguments)
        return flat


def _flatten(out: dict, key: tuple, value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(out, (*key, k), v)
    elif isinstance(value, np.ndarray):
        out[key] = value.tolist()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _flatten(out, key, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif isinstance(value, argparse.Namespace):
        _flatten(out, key, {k: v for k, v in vars(value).items() if k not in ("argv", "extra")})
    else:
        out[key] = value


MANIFEST = {"recall": {"recall@10": 1.0}, "num_vectors": 1, "model": "m", "factory": "Flat",
            "layout": "single", "search_params": {}, "build_seconds": 0.0}


def record_index(rec: Recorder) -> None:
    from index_builder import build, publish

    rec.replace(build, "build_index", MANIFEST)
    rec.replace(build, "train_step", {"factory": "Flat", "training_sample": 1,
                                      "quantization_error": 0.0, "seconds": 0.0})
    rec.replace(build, "add_step", {"added": 0})
    rec.replace(build, "merge_step", MANIFEST)
    rec.replace(publish, "upload_index", {"uploaded": 0, "bytes": 0, "removed": 0})


def record_search(rec: Recorder) -> None:
    from index_builder import search
    from remap_serve import gallery

    rec.replace(gallery, "write_results_page")

    class RecordedIndex:
        folder, fingerprint = "recorded-index", "recorded-model"

        def __len__(self):
            return 0

        def __init__(self):
            rec.replace(self, "search_images", lambda images, *a, **k: [[] for _ in images])
            rec.replace(self, "search_vectors",
                        lambda vectors, *a, **k: [[] for _ in np.atleast_2d(vectors)])

        def search_images(self, images, k: int = 10, model_uri: str | None = "manifest",
                          errors: str = "raise", filters: dict | None = None,
                          dedupe: bool = False, qe: int | None = None, qe_alpha: float | None = None,
                          **prep):
            raise AssertionError("replaced by a recorder")

        def search_vectors(self, vectors, k: int = 10, filters: dict | None = None,
                           dedupe: bool = False, qe: int | None = None, qe_alpha: float | None = None):
            raise AssertionError("replaced by a recorder")

    assert list(inspect.signature(RecordedIndex.search_images).parameters) == \
        list(inspect.signature(search.RemapIndex.search_images).parameters)
    assert list(inspect.signature(RecordedIndex.search_vectors).parameters) == \
        list(inspect.signature(search.RemapIndex.search_vectors).parameters)
    rec.replace(search, "open_index", lambda *a, **k: RecordedIndex())


def record_serve(rec: Recorder) -> None:
    import remap_serve

    class NotServed:
        def run(self):
            pass

    rec.replace(remap_serve, "build_server", lambda *a, **k: NotServed())


def record_embed(rec: Recorder) -> None:
    from pipelines import embed

    rec.replace(embed, "run", {"run_id": "recorded", "submitted": True})


def record_index_beam(rec: Recorder) -> None:
    from pipelines import index_build

    rec.replace(index_build, "run", {"index": "recorded", "dry_run": True})


def record_eval(rec: Recorder) -> None:
    from remap_core.evaluation import evaluate

    rec.replace(evaluate, "run", {"recorded": True})
    rec.monkeypatch.setattr(evaluate, "format_table", lambda report: "recorded table")


def record_train(rec: Recorder) -> None:
    from remap_core.training import run

    rec.replace(run, "run_training", {"model": None, "history": []})


def record_samples(rec: Recorder) -> None:
    from remap_core.data import samples

    rec.replace(samples, "write_samples", ([], []))


def record_export(rec: Recorder) -> None:
    from remap_core.descriptor import checkpoint

    rec.replace(checkpoint, "export_model", "recorded.fingerprint")


RECORDERS = {"embed": record_embed, "index-beam": record_index_beam,
             "index": record_index, "search": record_search, "serve": record_serve,
             "eval": record_eval, "train": record_train, "samples": record_samples,
             "export": record_export}


def observe(name: str, argv: list[str], monkeypatch, capsys) -> tuple[dict, Recorder]:
    """Run `remap <argv>` through the console with the command's library calls recorded."""
    with monkeypatch.context() as m:
        rec = Recorder(m)
        RECORDERS[name](rec)
        capsys.readouterr()
        rc = cli.main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"remap {' '.join(argv)} -> {rc}: {out.err}"
        return rec.observation(out.out), rec


def _carries(value, expected) -> bool:
    if value == expected:
        return True
    if isinstance(expected, list):
        return all(_carries(value, e) for e in expected)
    if isinstance(expected, str):
        return (isinstance(value, str) and expected in value) or \
            (isinstance(value, list) and expected in value)
    return False


def attributes_read(module, name: str = "args") -> set[str]:
    """Attributes of `name` that a module's code reads (args.x, getattr(args, "x", ...))."""
    tree = ast.parse(Path(module.__file__).read_text())
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == name:
            read.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "getattr" and len(node.args) >= 2 \
                and isinstance(node.args[0], ast.Name) and node.args[0].id == name \
                and isinstance(node.args[1], ast.Constant):
            read.add(node.args[1].value)
    return read


# --------------------------------------------------------------------------- the tests

def test_every_command_and_step_has_its_options_found():
    """The walk over the parsers finds the commands' options (a broken walk would pass every
    case below vacuously)."""
    cases = {c.id for c in _cases()}
    assert set(cli.COMMANDS) == {c.split()[0] for c in cases}
    for expected in ("embed --break_lease", "embed --lease_minutes",
                     "embed --unattended_lease_hours", "embed --torch_threads",
                     "index --layout", "index train --factory", "index add --workers",
                     "index merge --target-recall", "search --k", "search images",
                     "serve --index", "serve --reload-interval",
                     "eval --whiten", "train --epochs", "samples --output"):
        assert expected in cases, expected


def test_an_option_without_a_sample_value_fails_loudly(tmp_path):
    parser = argparse.ArgumentParser()
    action = parser.add_argument("--weights_json", type=json.loads, default=None)
    with pytest.raises(AssertionError, match="no sample value for --weights_json.*SAMPLES"):
        sample("embed", action, tmp_path)


@pytest.mark.parametrize("name, path, dest", _cases())
def test_option_reaches_the_code_that_uses_it(name, path, dest, tmp_path, monkeypatch,
                                              capsys):
    monkeypatch.chdir(tmp_path)           # anything a command writes stays in here
    action = _find(name, path, dest)
    tokens, expected = sample(name, action, tmp_path)
    base = {**base_arguments(name, path), **CONTEXT.get((name, dest), {})}
    given = {**{k: v for k, v in base.items() if k not in REPLACES.get((name, dest), ())},
             dest: tokens}
    flag = action.option_strings[-1] if action.option_strings else dest
    where = f"remap {' '.join((name, *path))} {flag}"

    if name in ("embed", "index-beam"):         # Beam jobs: the argv goes to Beam's parse
        from apache_beam.options.pipeline_options import PipelineOptions

        _, rec = observe(name, command_line(name, path, given), monkeypatch, capsys)
        ((fn, arguments),) = rec.calls
        parsed = PipelineOptions(arguments["argv"]).get_all_options()
        assert parsed[dest] == expected, (
            f"{where} {expected!r} reached {fn} as {parsed[dest]!r}")
        return

    before, _ = observe(name, command_line(name, path, base), monkeypatch, capsys)
    after, rec = observe(name, command_line(name, path, given), monkeypatch, capsys)
    if name in ("eval", "train"):
        ((fn, arguments),) = rec.calls
        options = arguments["options"]
        if dest not in {f.name for f in dataclasses.fields(options)}:    # the console's own
            module = importlib.import_module(cli.COMMANDS[name][0])
            assert dest in attributes_read(module), (
                f"{where} is parsed but {module.__name__} never reads args.{dest}")
            return
        assert getattr(options, dest) == expected, (
            f"{where} {expected!r} reached {fn} as {getattr(options, dest)!r}")
        library = inspect.getmodule(type(options))
        assert dest in attributes_read(library, "options"), (
            f"{where} reaches {type(options).__name__}.{dest} but {library.__name__} never "
            f"reads options.{dest}")
        return
    changed = {k: v for k, v in after.items() if before.get(k, "<absent>") != v}
    assert changed, (
        f"{where} {tokens[1:] or ''} changed nothing the library received or the command "
        f"printed: it does not reach its code (if it acts only with other options, add them to "
        f"CONTEXT in {__file__})")
    if not action.choices and not isinstance(expected, bool):   # a value, not a mode
        assert any(_carries(v, expected) for v in changed.values()), (
            f"{where} {expected!r}: what changed does not carry the value: {changed}")


def test_embed_hands_beam_its_own_options_unchanged(tmp_path, monkeypatch, capsys):
    """Options no remap parser knows go to Beam as given."""
    from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                      StandardOptions)

    argv = ["embed", "--input", "in", "--output=store", "--runner=DirectRunner",
            "--direct_num_workers", "2", "--full"]
    _, rec = observe("embed", argv, monkeypatch, capsys)
    ((_, arguments),) = rec.calls
    assert arguments["argv"] == argv[1:]
    options = PipelineOptions(arguments["argv"])
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2


def test_embed_refuses_abbreviated_options_as_beam_would(monkeypatch, capsys):
    """Beam parses without abbreviations: `--inp` would reach it as an unknown flag and be
    dropped, so the console refuses it instead of accepting it as --input."""
    with monkeypatch.context() as m:
        rec = Recorder(m)
        record_embed(rec)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["embed", "--inp", "in", "--output", "store"])
    assert exit_.value.code == 2 and rec.calls == []
    assert "--input" in capsys.readouterr().err


def test_remap_embed_break_lease_takes_over_a_live_lease_of_another_host(
        tmp_path, tiny_model_path, capsys, caplog):
    """The defect --break_lease had: dropped by the console, so the run was refused with the
    very message that says to pass it. A store leased by a live run of another host: refused
    (75, naming the holder) without --break_lease, taken over with a warning naming it with."""
    import logging

    import image_cases as C
    from remap_store import lease as L

    images, store = tmp_path / "images", tmp_path / "store"
    C.write_collection(images, n_good=2, odd=False, bad=False)
    holder = L.new_lease("20260101T000000000Z-other0", 30 * 86400, local=True, renewed=True)
    holder.update(host="other-host.example", pid=4242)    # alive as far as this host can tell
    L.acquire(str(store), holder)
    argv = ["embed", f"--input={images}", f"--output={store}", f"--model={tiny_model_path}",
            "--progress_seconds=0"]

    assert cli.main(argv) == 75
    err = capsys.readouterr().err
    assert err.startswith("remap embed: error: store ") and "--break_lease" in err
    assert "run 20260101T000000000Z-other0 (host other-host.example, pid 4242" in err
    assert L.read_lease(str(store)) == holder and not list(store.glob("run-*"))

    with caplog.at_level(logging.WARNING, logger="remap_store.lease"):
        assert cli.main([*argv, "--break_lease"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["read"], summary["embedded"]) == (2, 2)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "remap_store.lease" and r.levelno == logging.WARNING]
    assert any("taking over the lease" in w and "run 20260101T000000000Z-other0 (host "
               "other-host.example, pid 4242" in w and w.endswith(": --break_lease")
               for w in warnings), warnings
    assert (store / f"run-{summary['run_id']}" / "run.json").exists()
    assert L.read_lease(str(store)) is None              # the run's job gave it back
