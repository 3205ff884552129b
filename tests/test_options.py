"""The one option table (`sfr_cli.options`): the README's option tables, `sfr render`, `sfr batch`, the
manifest's columns and the `Renderer`'s keywords all say what the table says, and a stage module's rows
join it."""

import json
import re
import subprocess
import sys
import types
from dataclasses import MISSING, fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sfr_cli import batch as batching
from sfr_cli import batch_plan
from sfr_cli import manifest as manifests
from sfr_cli import options
from sfr_cli.cli import batch, render
from sfr_cli.errors import ConfigError
from sfr_cli.jobs import RenderJob
from sfr_cli.stages import stage_modules

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def readme_first_cells(heading: str):
    """The first cell of every body row of the first markdown table after `heading`."""
    lines = README.splitlines()
    assert heading in lines, f"README.md has no heading {heading!r}"
    table = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    assert len(table) > 2, f"no table under {heading!r}"
    return [re.split(r"(?<!\\)\|", line.strip().strip("|"))[0] for line in table[2:]]


def code_spans(cell: str):
    return re.findall(r"`([^`]*)`", cell)


def flags_in(cell: str):
    return {flag for span in code_spans(cell) for flag in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", span)}


def command_flags(command: click.Command):
    return {flag for param in command.params if isinstance(param, click.Option)
            for flag in (*param.opts, *param.secondary_opts)}


def documented_flags(heading: str):
    cells = readme_first_cells(heading)
    found = [flags_in(cell) for cell in cells]
    assert all(found), f"{heading}: a row names no option: {[c for c, f in zip(cells, found) if not f]}"
    return set().union(*found)


def test_parser_reads_flags_and_columns():
    assert flags_in("`-o, --output PATH`") == {"-o", "--output"}
    assert flags_in("`--still / --no-still`") == {"--still", "--no-still"}
    assert flags_in(r"`--ray local\|auto\|ADDRESS`") == {"--ray"}
    assert code_spans("`yaw`, `pitch`, `roll`") == ["yaw", "pitch", "roll"]


@pytest.mark.parametrize("heading, command", [("## `sfr render` options", render),
                                              ("### `sfr batch` options", batch)])
def test_readme_documents_every_option_and_no_other(heading, command):
    documented, declared = documented_flags(heading), command_flags(command)
    assert not declared - documented, f"README.md ({heading}) does not document {sorted(declared - documented)}"
    assert not documented - declared, f"README.md ({heading}) documents unknown {sorted(documented - declared)}"


def test_readme_documents_every_manifest_column_and_no_other():
    documented = {name for cell in readme_first_cells("### `sfr batch` columns") for name in code_spans(cell)}
    columns = {row.name for row in options.column_rows()}
    assert documented == columns, (f"README.md's columns table: missing {sorted(columns - documented)}, "
                                   f"not columns {sorted(documented - columns)}")


@pytest.mark.parametrize("command", [render, batch], ids=["render", "batch"])
def test_commands_declare_exactly_their_table_rows(command):
    from_table = [param for param in command.params if isinstance(param, options.TableOption)]
    rows = options.command_rows(command.name)
    assert sorted(param.row.name for param in from_table) == sorted(row.name for row in rows)
    for param in from_table:
        row = param.row
        assert param.name == row.name  # the command function receives the RenderJob field's name
        assert param.help == row.help_in(command.name)
        assert param.required == row.required
        declared = set(param.opts) | set(param.secondary_opts)
        assert declared == {flag for decl in row.flags for flag in decl.split("/")}
    # Nothing else of the command shares a row's flags: each option is declared once.
    others = command_flags(command) - {f for p in from_table for f in (*p.opts, *p.secondary_opts)}
    assert not others & {flag for row in options.table() for decl in row.flags for flag in decl.split("/")
                         if command.name in row.commands}


def job_option_names():
    """The RenderJob's fields and, for its `stages`, every stage's `Options` fields."""
    names = {f.name for f in fields(RenderJob)} - {"stages"}
    return names | {f.name for options in RenderJob(coeffs=Path("."), source=Path(".")).stages.values()
                    for f in fields(options)}


def test_every_render_job_field_is_one_row():
    names = [row.name for row in options.table()]
    assert len(names) == len(set(names))
    assert set(names) == job_option_names()
    assert all(row.scope in (options.SHARED, options.CLIP) for row in options.table())
    assert all(row.scope == options.CLIP for row in options.column_rows())  # a shared setting is no cell


@pytest.mark.parametrize("row", [row for row in options.table() if not row.required], ids=lambda row: row.name)
def test_the_command_line_default_is_the_render_jobs(row):
    assert row.convert(row.default) == RenderJob(coeffs=Path("."), source=Path(".")).option(row.name)


def test_required_rows_are_the_render_jobs_required_fields():
    required = {f.name for f in fields(RenderJob) if f.default is MISSING and f.default_factory is MISSING}
    assert required == {row.name for row in options.table() if row.required}


def test_the_manifest_reader_takes_every_column_and_only_those(tmp_path):
    """What a reader of a manifest does with its header, not the constants it is built from: every column
    of the table is accepted, a name outside it is refused with the table's names, and a row missing a
    required column is marked (coeffs and source: the only required columns)."""
    names = [row.name for row in options.column_rows()]
    every = tmp_path / "every.csv"
    every.write_text(",".join(names) + "\n" + ",".join("c.npy" if name == "coeffs" else "" for name in names) + "\n")
    (row,) = manifests.read_manifest(every)
    assert row.error == "no source; every row needs coeffs and source"
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("coeffs,source,ouptut\nc.npy,f.png,a.mp4\n")
    with pytest.raises(manifests.ManifestError) as caught:
        manifests.read_manifest(unknown)
    assert str(caught.value).endswith(f"unknown column(s) ouptut; columns are {', '.join(names)}")
    keys = tmp_path / "unknown.jsonl"
    keys.write_text('{"coeffs": "c.npy", "source": "f.png", "ouptut": "a.mp4"}\n')
    with pytest.raises(manifests.ManifestError, match=f"keys are {re.escape(', '.join(names))}$"):
        manifests.read_manifest(keys)
    required = [row.name for row in options.column_rows() if row.required]
    assert required == ["coeffs", "source"]
    for name in required:
        cells = {"coeffs": "c.npy", "source": "f.png", name: ""}
        lonely = tmp_path / f"no-{name}.jsonl"
        lonely.write_text(json.dumps(cells) + "\n")
        (row,) = manifests.read_manifest(lonely)
        assert row.error == f"no {name}; every row needs coeffs and source"


def test_every_column_is_read_and_paths_are_taken_from_the_manifest(tmp_path):
    cells = {"coeffs": "c.npy", "source": "face.png", "source_coeffs": "s.npy", "output": "out/a.mp4",
             "frames_dir": "frames", "audio": "a.wav", "fps": "30", "preprocess": "full", "still": "yes",
             "expression_scale": "1.5", "yaw": "0,20", "pitch": "5", "roll": "-5"}
    assert set(cells) == {row.name for row in options.CORE_OPTIONS if row.column}  # a new core column: a cell here
    manifest = tmp_path / "sub" / "clips.csv"
    manifest.parent.mkdir()
    manifest.write_text(",".join(cells) + "\n" + ",".join(f'"{v}"' for v in cells.values()) + "\n")
    (row,) = manifests.read_manifest(manifest)
    assert row.error is None
    job = batch_plan.row_job(row, batch_plan.BatchDefaults(RenderJob(coeffs=Path("."), source=Path("."))))
    for column in (row for row in options.CORE_OPTIONS if row.column):
        value = job.option(column.name)
        if column.path:
            assert value == manifest.parent / cells[column.name]
        else:
            assert value == column.type.convert(cells[column.name], None, None)
    assert (job.fps, job.still, job.yaw) == (30.0, True, (0.0, 20.0))


def test_a_bad_cell_gets_the_options_message(tmp_path):
    (row,) = [manifests.ManifestRow(1, {"coeffs": "c.npy", "source": "f.png", "fps": "0"})]
    with pytest.raises(Exception) as caught:
        batch_plan.row_job(row, batch_plan.BatchDefaults(RenderJob(coeffs=Path("."), source=Path("."))))
    assert str(caught.value).startswith("fps: ") and "above 0" in str(caught.value)


def test_renderer_settings_are_the_shared_rows(tmp_path):
    from sfr_cli.renderer import Renderer

    SHARED_FIELDS = [row.name for row in options.shared_rows()]
    assert not set(SHARED_FIELDS) & {row.name for row in options.clip_rows()}
    renderer = Renderer()
    assert set(renderer.settings) == set(SHARED_FIELDS)
    default = RenderJob(coeffs=Path("."), source=Path("."))
    assert renderer.settings == {name: default.option(name) for name in SHARED_FIELDS}
    # Every shared row is a constructor keyword; the batch's settings build the same Renderer.
    template = RenderJob(coeffs=Path("."), source=Path("."), checkpoint_dir=tmp_path, config="tiny", size_px=512,
                         batch_size=3, device="cpu", precision="bf16", compile=True, checkpoint=tmp_path / "r",
                         mapping=tmp_path / "m")
    settings = batching.renderer_settings(template)
    assert set(settings) == {row.api_name for row in options.shared_rows()}
    assert Renderer(**settings).settings == {name: template.option(name) for name in SHARED_FIELDS}
    with pytest.raises(ConfigError, match="unknown setting"):
        Renderer(fps=30)  # a clip's option, not a setting
    for row in options.clip_rows():  # every clip option is refused as a setting, by its own keyword
        with pytest.raises(ConfigError, match=f"unknown setting\\(s\\) {row.api_name};"):
            Renderer(**{row.api_name: None})


def test_renderer_job_takes_exactly_the_clip_rows(tmp_path):
    from sfr_cli.renderer import Renderer

    renderer = Renderer(device="cpu")
    given = {"source_coeffs": "s.npy", "output": "a.mp4", "frames_dir": "f", "audio": "a.wav", "fps": 30.0,
             "preprocess": "full", "still": True, "expression_scale": 2.0, "yaw": [0, 20], "pitch": 5,
             "roll": "1,2", "overwrite": True, "paste_into": "pic.png", "crop_box": (0, 0, 9, 9)}
    stage_rows = {row.name for module in stage_modules() for row in module.OPTIONS}
    assert {"paste_into", "crop_box", "enhancer"} <= stage_rows  # paste-back's and the enhancer's own rows
    assert set(given) | {"coeffs", "source"} == {row.name for row in options.clip_rows()} - (stage_rows - set(given))
    given.update({row.name: row.convert(row.default) for row in options.clip_rows()
                  if row.name not in given and row.name not in ("coeffs", "source")})
    job = renderer.job("c.npy", "face.png", **given)
    for row in options.clip_rows():
        if row.path and job.option(row.name) is not None:
            assert isinstance(job.option(row.name), Path), row.name
    assert (job.yaw, job.pitch, job.roll) == ((0.0, 20.0), (5.0,), (1.0, 2.0))
    for row in options.shared_rows():
        with pytest.raises(ConfigError, match="unknown option"):
            renderer.job("c.npy", "face.png", **{row.name: job.option(row.name)})


@pytest.fixture
def stage_with_rows(monkeypatch):
    """A stage module bringing two rows, registered the way a real one is (one name in STAGE_MODULES)."""
    from sfr_cli import stages

    def install(rows):
        module = types.ModuleType("sfr_cli.stages.fake_for_test")
        module.OPTIONS = rows
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setattr(stages, "STAGE_MODULES", stages.STAGE_MODULES + ("fake_for_test",))
        options.table.cache_clear()

    yield install
    monkeypatch.undo()
    options.table.cache_clear()


def test_a_stage_modules_rows_join_the_table_and_the_commands(stage_with_rows):
    rows = (options.OptionRow("sharpen", ("--sharpen",), "Sharpen.", type=click.Choice(["none", "unsharp"]),
                              default="none", column=True),
            options.OptionRow("sharpen_dir", ("--sharpen-dir",), "Its weights.", path=True,
                              scope=options.SHARED))
    stage_with_rows(rows)
    assert options.table()[-2:] == rows
    assert [row.name for row in options.column_rows()][-1] == "sharpen"
    assert options.shared_rows()[-1] == rows[1]

    @click.command()
    @options.command_options(options.BATCH)
    def command(**given):
        click.echo(repr(sorted((k, v) for k, v in given.items() if k.startswith("sharpen"))))

    result = CliRunner().invoke(command, ["--sharpen", "unsharp", "--sharpen-dir", "w"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr([("sharpen", "unsharp"), ("sharpen_dir", Path("w"))])
    assert options.convert_cell("sharpen", "unsharp") == "unsharp"


def test_a_row_declared_twice_is_refused(stage_with_rows):
    stage_with_rows((options.OptionRow("frames_per_second", ("--fps",), "Clashes with the core's --fps."),))
    with pytest.raises(ValueError, match="--fps declared twice"):
        options.table()


def test_reading_the_table_for_help_stays_light():
    """`sfr --help` imports each stage module for its rows: they keep torch and media's imports inside."""
    code = ("import sys\n"
            "import sfr_cli.cli as cli\n"
            "for args in (['render', '--help'], ['batch', '--help']):\n"
            "    try:\n"
            "        cli.sfr.main(args, prog_name='sfr')\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, (args, exc.code)\n"
            "heavy = sorted(m for m in ('torch', 'scipy', 'imageio', 'PIL') if m in sys.modules)\n"
            "assert not heavy, f'sfr --help imported {heavy}'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
