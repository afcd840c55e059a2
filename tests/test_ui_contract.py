"""The contract between the web UI and its runs (:mod:`video_infinity.run.contract`): each message
round-trips through its JSON file, a file that is not the message is refused with one line (and a
progress file is skipped), another version is refused; the command line reports to the folder of a
request; a failing run's error reaches the UI through the folder, with its rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from video_infinity.cli import main
from video_infinity.errors import ConfigError, ModelLoadError, RunError, RunInterrupted
from video_infinity.run.config import validate_run_config
from video_infinity.run.contract import (
    CONTRACT_VERSION,
    ContractError,
    ErrorReport,
    ProgressEvent,
    RunRequest,
    RunResult,
    StatusFolder,
    read_message,
    write_message,
)
from video_infinity.run.progress import read_progress
from video_infinity.ui.form import GenerationForm, Limits
from video_infinity.ui.studio import Studio

CONFIG = {"devices": ["cpu"], "seed": 3, "pipe_configs": {"prompts": {"0": "a red circle"}, "num_frames": 8,
                                                          "height": 64, "width": 64, "steps": 2}}


def _messages(tmp_path: Path) -> list:
    return [
        RunRequest(config=validate_run_config({**CONFIG, "base_path": str(tmp_path)}), config_path="/x/run.config.json",
                   resume="/x/run.ckpt", contact_sheet=True, step_sleep_s=0.5),
        ProgressEvent(rank=1, world_size=2, pid=42, phase="denoising", step=3, steps=10, start_step=2,
                      denoise_started=100.0, time=103.5),
        RunResult(video="/x/run.mp4", sidecar="/x/run.json", contact_sheet="/x/run.png", seed=3, world_size=2,
                  total_frames=16, seconds={"total": 4.5, "load": 1.0}, peak_memory_bytes=[2**20, 2**21]),
        ErrorReport(message="rank 1 failed: ValueError: boom", rank=1, exit_kind="failure", exit_code=1),
    ]


@pytest.mark.unit
def test_every_message_round_trips_through_its_file(tmp_path):
    for message in _messages(tmp_path):
        path = tmp_path / f"{message.kind}.json"
        write_message(path, message)
        assert read_message(path, type(message)) == message
        data = json.loads(path.read_text())
        assert (data["kind"], data["version"]) == (message.kind, CONTRACT_VERSION)
    assert read_message(tmp_path / "absent.json", RunResult) is None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically: no leftovers


@pytest.mark.unit
def test_a_file_that_is_not_the_message_is_refused_in_one_line_and_skipped_as_progress(tmp_path):
    folder = StatusFolder(tmp_path)
    result = tmp_path / "result.json"
    for text, words in [("{half-writ", "not a result message (Expecting"),
                        ('{"kind": "error", "version": 1}', "not a result message (kind: 'error')"),
                        ('{"kind": "result", "version": 1, "video": "a.mp4"}', "not a result message (sidecar: "),
                        ("[1, 2]", "not a result message (kind: 'list')")]:
        result.write_text(text)
        with pytest.raises(ContractError) as info:
            folder.outcome()
        assert str(info.value).startswith(f"{result}: {words}") and "\n" not in str(info.value), str(info.value)
    # A progress file that is not (yet) an event is skipped: the UI polls again.
    write_message(folder.progress_path(0), _messages(tmp_path)[1].model_copy(update={"rank": 0}))
    folder.progress_path(1).write_text('{"kind": "progress", "ver')
    progress = read_progress(folder)
    assert progress.ranks_reporting == 1 and progress.per_rank[0].rank == 0


@pytest.mark.unit
def test_another_contract_version_is_refused_naming_both(tmp_path):
    report = _messages(tmp_path)[3]
    path = tmp_path / "error.json"
    path.write_text(json.dumps({**report.payload(), "version": CONTRACT_VERSION + 1}))
    with pytest.raises(ContractError, match=f"contract version {CONTRACT_VERSION + 1}, this video-infinity reads "
                                            f"version {CONTRACT_VERSION} \\(the UI and the run come from different"):
        read_message(path, ErrorReport)
    path.write_text(json.dumps({k: v for k, v in report.payload().items() if k != "version"}))
    with pytest.raises(ContractError, match="contract version None"):
        read_message(path, ErrorReport)


@pytest.mark.unit
def test_an_error_report_says_what_kind_of_end_and_which_rank():
    def report(exc: BaseException) -> tuple:
        r = ErrorReport.from_exception(exc)
        return r.message, r.rank, r.exit_kind, r.exit_code

    assert report(ConfigError("pipe_configs.height: must be a multiple of 8")) == (
        "pipe_configs.height: must be a multiple of 8", None, "user_error", 2)
    assert report(RunError("rank 1 failed: ValueError: boom", 1, rank=1)) == (
        "rank 1 failed: ValueError: boom", 1, "failure", 1)
    assert report(RunError("cannot load unet: shapes differ", 2, rank=0))[1:] == (0, "user_error", 2)
    assert report(RunInterrupted("terminated (SIGTERM): all 2 ranks stopped", 143))[2:] == ("interrupted", 143)
    assert report(KeyboardInterrupt())[1:] == (None, "interrupted", 130)
    refused = ModelLoadError("cannot load unet")
    refused.rank = 0
    assert report(refused)[1:] == (0, "user_error", 2)


@pytest.mark.unit
def test_generate_reports_a_refused_request_to_its_folder_as_it_prints_it(tmp_path, capsys):
    folder = StatusFolder(tmp_path / "status")
    config = validate_run_config({**CONFIG, "base_path": str(tmp_path / "out"), "model": str(tmp_path / "none")})
    request = folder.write_request(RunRequest(config=config))
    assert main(["generate", "--request", str(request)]) == 2
    line = capsys.readouterr().err.strip()
    report = folder.outcome()
    assert isinstance(report, ErrorReport) and line == f"video-infinity: error: {report.message}"
    assert (report.exit_kind, report.rank, report.exit_code) == ("user_error", None, 2)
    assert "model: folder" in report.message and "does not exist" in report.message

    request.write_text('{"kind": "request", "version": 99}')
    assert main(["generate", "--request", str(request)]) == 2
    assert "contract version 99" in folder.outcome().message and "contract version 99" in capsys.readouterr().err
    assert main(["generate", "--request", str(request), "--overwrite"]) == 2
    assert "--request: the request holds the whole run" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_failing_runs_error_reaches_the_ui_through_the_contract(tmp_path, capfd):
    """A model whose weights do not fit its config passes the pre-flight checks and fails in the
    ranks: the UI shows the launcher's line and the failing rank, read from ``error.json``."""
    from video_infinity.demo import WEIGHTS_DIR

    model = tmp_path / "model"
    shutil.copytree(WEIGHTS_DIR, model)
    unet = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**unet, "cross_attention_dim": 32}))
    studio = Studio(tmp_path / "runs", limits=Limits(max_cpu_processes=2))
    form = GenerationForm(prompts={0: "a red circle moving right"}, num_frames=8, height=64, width=64, steps=2,
                          devices="2", seed=1, model=str(model))
    job, name = studio.start(form)
    seen = list(studio.follow(job))
    outcome = studio.finish(job, name)
    assert outcome.status == "failed" and outcome.rank in (0, 1), outcome
    assert "unet" in outcome.message and "\n" not in outcome.message
    assert outcome.headline() == f"**failed** (rank {outcome.rank}): {outcome.message}"
    assert seen and seen[0].phase in ("waiting", "loading")
    # The same line the launcher printed for people; the UI read it from the run's report.
    assert f"video-infinity: error: {outcome.message}" in capfd.readouterr().err
    assert outcome.record is not None and outcome.record.status == "stopped"
    assert not job.folder.path.exists()  # the status folder goes with the job
