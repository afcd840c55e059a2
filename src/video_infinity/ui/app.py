"""The Gradio app: the form, live progress, the result and past runs, wired to a :class:`Studio`.

Two events start a generation and share one concurrency group of size 1, so one runs at a time and
the others wait in Gradio's queue (the page shows their position): the Generate button (the prompt
timeline as rows) and the ``generate`` API endpoint (the timeline as JSON text), which
``gradio_client`` calls with named parameters.

Beside the timeline, two image uploads (``image``, ``last_image``: an image-to-video model's first and
last frames; empty: none) go into the run config's ``pipe_configs.image`` / ``last_image``; the
endpoint takes them as its last parameters (``gradio_client.handle_file(path)``). A run keeps copies
of them beside its video (:meth:`Studio.keep_images`), which "use these settings" loads back.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from ..presets import PRESETS
from ..run.progress import RunProgress
from ..schedulers import SCHEDULER_NAMES
from .form import (
    DEFAULT_PRESET,
    DEFAULT_SCHEDULER,
    EMBEDDED_MODEL_SETTINGS,
    FORM_FIELDS,
    FORM_IMAGES,
    FormError,
    GenerationForm,
    embedded_model_settings,
    form_from_config,
    form_from_values,
    model_choices,
    parse_timeline,
    timeline_from_rows,
)
from .runs import GALLERY_COLUMNS, RunRecord, find_run, list_runs
from .studio import Outcome, Studio

logger = logging.getLogger(__name__)

TIMELINE_ROWS = 12
"""Prompt rows the timeline offers."""
GENERATION = "generation"
"""The concurrency group of everything that runs a generation (one at a time)."""

PAGE_CSS = ".validation-error { overflow-wrap: anywhere; }"
"""The page's own style (``launch(css=...)``): a field's message breaks inside a long path (a model
folder's, an image's) instead of running out of its box."""

_DEMO_FORM = GenerationForm(prompts={0: "a red circle moving right", 8: "a green circle moving right"},
                            num_frames=16, height=64, width=64, steps=20, devices="1", seed=0, guidance_scale=5.0,
                            transition_frames=4)


def default_form(studio: Studio) -> GenerationForm:
    """The form's first values: the server's ``--config``, else a demo-model video a laptop makes in seconds.
    The config's images start the form only when they lie under base_path (the page shows nothing else)."""
    if studio.template is None:
        return _DEMO_FORM
    form = form_from_config(studio.template)
    for name in FORM_IMAGES:
        path = getattr(form, name)
        if path and studio.servable(Path(path)) is None:
            logger.warning("pipe_configs.%s: %s is outside base_path, so the form starts without it (copy it under "
                           "%s to have it shown, or upload it on the page)", name, path, studio.base)
            form = replace(form, **{name: ""})
    return form


def _progress_text(progress: RunProgress) -> str:
    rows = "".join(f"\n| {r.rank} | {r.phase} | {r.step}/{r.steps or '?'} |" for r in progress.per_rank)
    table = f"\n\n| rank | phase | step |\n|---|---|---|{rows}" if rows else ""
    return f"**{progress.describe()}**{table}"


def _facts_text(record: RunRecord) -> str:
    facts = record.facts()
    if not facts:
        return f"**{record.name}**: {record.status}"
    seconds = facts["seconds"]
    memory = ", ".join(f"{m:.0f}" for m in facts["peak_memory_mib"])
    return (f"**{record.name}**: {facts['frames']} frames {facts['size']}, {facts['steps']} steps, seed {facts['seed']}, "
            f"{facts['ranks']} rank(s) on {', '.join(facts['devices'] or [])}  \n"
            f"{seconds.get('total', 0):.1f} s in all (load {seconds.get('load', 0):.1f} s, denoise "
            f"{seconds.get('denoise', 0):.1f} s, decode and write {seconds.get('decode_and_write', 0):.1f} s), "
            f"{facts['frames_per_second']:.2f} frames/s; peak memory per rank: {memory} MiB")


def build_app(studio: Studio) -> gr.Blocks:
    """The web UI of ``studio`` (call ``.queue().launch(...)`` on it)."""
    start = default_form(studio)
    presets = [DEFAULT_PRESET, *sorted(PRESETS)]
    schedulers = [DEFAULT_SCHEDULER, *SCHEDULER_NAMES]

    with gr.Blocks(title="Video-Infinity", analytics_enabled=False) as app:
        gr.Markdown("## Video-Infinity: long videos from text (and a start image), the frames split over several "
                    "processes")
        with gr.Row():
            with gr.Column(scale=5):
                gr.Markdown("### Prompt timeline: each prompt starts at its frame")
                rows = sorted(start.prompts.items())
                starts, prompts, row_boxes = [], [], []
                for index in range(TIMELINE_ROWS):
                    frame, text = rows[index] if index < len(rows) else (None, "")
                    with gr.Row(visible=index < max(2, len(rows))) as row:
                        starts.append(gr.Number(value=frame, label=f"start frame {index + 1}", precision=0, minimum=0,
                                                scale=1, elem_id=f"start-{index}"))
                        prompts.append(gr.Textbox(value=text, label=f"prompt {index + 1}", scale=5,
                                                  elem_id=f"prompt-{index}"))
                    row_boxes.append(row)
                shown = gr.State(max(2, len(rows)))
                with gr.Row():
                    add_row = gr.Button("Add prompt", size="sm", elem_id="add-prompt")
                    remove_row = gr.Button("Remove last prompt", size="sm", elem_id="remove-prompt")
                with gr.Row(equal_height=True):  # image-to-video models (Wan I2V, TI2V); empty: from text only
                    image = gr.Image(start.image or None, type="filepath", label="start image (image-to-video "
                                     "models: the first frame)", sources=["upload", "clipboard"], height=180,
                                     elem_id="image")
                    last_image = gr.Image(start.last_image or None, type="filepath", label="end image (first-last-frame "
                                          "models: the last frame)", sources=["upload", "clipboard"], height=180,
                                          elem_id="last-image")
                with gr.Row():
                    keyframe_mode = gr.Radio([("hold each prompt, then cross-fade", "hold"),
                                              ("blend gradually from prompt to prompt (FreeNoise)", "interpolate")],
                                             value=start.keyframe_mode, label="between prompts", elem_id="keyframe-mode")
                    transition = gr.Number(start.transition_frames, label="cross-fade frames (hold)", precision=0,
                                           minimum=0, elem_id="transition-frames")
                    negative = gr.Textbox(start.negative_prompt, label="negative prompt", elem_id="negative-prompt")
                with gr.Row():
                    num_frames = gr.Number(start.num_frames, label="frames", precision=0, minimum=1, elem_id="num-frames")
                    height = gr.Number(start.height, label="height", precision=0, minimum=8, elem_id="height")
                    width = gr.Number(start.width, label="width", precision=0, minimum=8, elem_id="width")
                    steps = gr.Number(start.steps, label="steps", precision=0, minimum=1, elem_id="steps")
                with gr.Row():
                    guidance = gr.Number(start.guidance_scale, label="guidance scale", minimum=0, elem_id="guidance")
                    seed = gr.Number(start.seed, label="seed", precision=0, elem_id="seed")
                    scheduler = gr.Dropdown(schedulers, value=start.scheduler, label="scheduler", elem_id="scheduler")
                with gr.Row():
                    # The embedded models to choose from; a folder or hub id can be typed in (empty: "demo").
                    model = gr.Dropdown(model_choices(), value=start.model, allow_custom_value=True,
                                        label="model (embedded, or a folder or hub id)",
                                        info="empty: demo; choosing an embedded model sets its frames, size and steps",
                                        elem_id="model")
                    devices = gr.Textbox(start.devices, label="devices",
                                         info='number of CPU processes ("2"), or GPU ids ("gpu:0,1")', elem_id="devices")
                with gr.Accordion("Engine and advanced settings", open=False, elem_id="advanced"):
                    with gr.Row():
                        preset = gr.Dropdown(presets, value=start.preset, label="engine preset", elem_id="preset")
                        base_model = gr.Textbox(start.base_model, label="base model (VAE, text encoder)",
                                                placeholder="same as the model", elem_id="base-model")
                    with gr.Row():
                        padding = gr.Number(start.padding, label="padding (local window, each side)", precision=0,
                                            minimum=0, elem_id="padding")
                        top_k = gr.Number(start.top_k, label="top_k (global frames)", precision=0, minimum=0,
                                          elem_id="top-k")
                        phase_t = gr.Number(start.phase_t, label="phase switch t", minimum=0, elem_id="phase-t")
                        phase_bias = gr.Number(start.phase_bias, label="phase bias (0: none)", elem_id="phase-bias")
                    with gr.Row():
                        loop = gr.Checkbox(start.loop, label="seamless loop", elem_id="loop")
                        export_fps = gr.Number(start.export_fps, label="MP4 frame rate", precision=0, minimum=1,
                                               elem_id="export-fps")
                        checkpoint_every = gr.Number(start.checkpoint_every, label="checkpoint every N steps (0: never)",
                                                     precision=0, minimum=0, elem_id="checkpoint-every")
                    engine_json = gr.Code(start.engine_json or None, language="json",
                                          label="engine settings as JSON (plugin_configs; overrides the preset)",
                                          elem_id="engine-json")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=4):
                status = gr.Markdown("Ready.", elem_id="status")
                progress = gr.Markdown("", elem_id="progress")
                video = gr.Video(label="video", elem_id="result-video", interactive=False, autoplay=False)
                sheet = gr.Image(label="contact sheet", type="filepath", interactive=False, elem_id="contact-sheet")
                facts = gr.Markdown("", elem_id="facts")
                report = gr.Textbox(label="demo probe report (object colour, motion, clip-border jumps)", lines=6,
                                    interactive=False, elem_id="probe-report")
                sidecar = gr.JSON(label="sidecar", elem_id="sidecar")
        gr.Markdown("### Past runs (newest first)")
        with gr.Row():
            chosen = gr.Dropdown([], label="run", elem_id="run-choice", scale=3)
            show = gr.Button("Show", size="sm", elem_id="show-run")
            use = gr.Button("Use these settings", size="sm", elem_id="use-settings")
            resume = gr.Button("Resume", size="sm", elem_id="resume")
            refresh = gr.Button("Refresh", size="sm", elem_id="refresh")
        gallery = gr.HTML(_gallery_html([]), elem_id="gallery")

        # Form inputs in GenerationForm's order (the timeline rows first).
        by_field: dict[str, Any] = {
            "transition_frames": transition, "keyframe_mode": keyframe_mode, "negative_prompt": negative, "num_frames": num_frames, "height": height,
            "width": width, "steps": steps, "devices": devices, "seed": seed, "guidance_scale": guidance,
            "scheduler": scheduler, "model": model, "base_model": base_model, "preset": preset,
            "engine_json": engine_json, "padding": padding, "top_k": top_k, "phase_t": phase_t,
            "phase_bias": phase_bias, "loop": loop, "export_fps": export_fps, "checkpoint_every": checkpoint_every,
            "image": image, "last_image": last_image,
        }
        field_names = [name for name in FORM_FIELDS if name != "prompts"]
        form_inputs = [*starts, *prompts, *(by_field[name] for name in field_names)]

        def form_of(values: tuple[Any, ...]) -> GenerationForm:
            row_starts, row_prompts = values[:TIMELINE_ROWS], values[TIMELINE_ROWS:2 * TIMELINE_ROWS]
            rest = dict(zip(field_names, values[2 * TIMELINE_ROWS:], strict=True))
            timeline = timeline_from_rows(list(zip(row_starts, row_prompts, strict=True)))
            return form_from_values(timeline, rest)

        def validate(*values: Any) -> list[Any]:
            """Each field's message where the CLI would refuse the run (nothing starts)."""
            problem: FormError | None = None
            try:
                studio.check(form_of(values))
            except FormError as exc:
                problem = exc
            except (TypeError, ValueError) as exc:
                problem = FormError(None, str(exc))
            target = None if problem is None else _component_of(problem.field)
            return [gr.validate(component is not target, str(problem) if component is target else "")
                    for component in form_inputs]

        def _component_of(name: str | None) -> Any:
            if name == "prompts":
                return prompts[0]
            return by_field.get(name) if name else None

        results = [status, progress, video, sheet, facts, report, sidecar, gallery, chosen]

        def show_outcome(outcome: Outcome) -> dict[Any, Any]:
            record = outcome.record
            update: dict[Any, Any] = {status: outcome.headline(), **refresh_gallery()}
            if record is not None:
                update.update({
                    video: studio.servable(record.video), sheet: studio.servable(record.contact_sheet),
                    facts: _facts_text(record), report: outcome.probe_report or "",
                    sidecar: record.sidecar if record.sidecar is not None else {"status": record.status},
                    chosen: gr.update(choices=[r.name for r in list_runs(studio.base)], value=record.name),
                })
            return update

        def run_and_follow(start_job: Any) -> Iterator[dict[Any, Any]]:
            try:
                job, name = start_job()
            except FormError as exc:
                yield {status: f"**refused**: {exc}", progress: ""}
                return
            finished = False
            try:
                yield {status: f"**running**: {name}", progress: "starting the ranks", video: None, sheet: None,
                       facts: "", report: "", sidecar: None}
                for state in studio.follow(job):
                    yield {progress: _progress_text(state)}
                outcome = studio.finish(job, name)
                finished = True
                yield show_outcome(outcome)
            finally:
                if not finished:  # the page went away: the run goes on and is finished off in the background
                    threading.Thread(target=studio.finish, args=(job, name), name=f"finish-{name}", daemon=True).start()

        def generate_from_form(*values: Any) -> Iterator[dict[Any, Any]]:
            try:
                form = form_of(values)
            except FormError as exc:
                yield {status: f"**refused**: {exc}"}
                return
            yield from run_and_follow(lambda: studio.start(form))

        def resume_chosen(name: str | None) -> Iterator[dict[Any, Any]]:
            if not name:
                yield {status: "**refused**: choose a run to resume"}
                return
            yield from run_and_follow(lambda: studio.resume(name))

        def refresh_gallery() -> dict[Any, Any]:
            records = list_runs(studio.base)
            return {gallery: _gallery_html(records, studio),
                    chosen: gr.update(choices=[r.name for r in records])}

        def show_run(name: str | None) -> dict[Any, Any]:
            if not name:
                return {status: "choose a run"}
            try:
                record = find_run(studio.base, name)
            except ValueError as exc:
                return {status: f"**refused**: {exc}"}
            return show_outcome(Outcome(record.status, record.name, record, studio.probe_report(record)))

        def use_settings(name: str | None) -> list[Any]:
            try:
                form, notes = studio.settings(name or "")
            except (ValueError, TypeError) as exc:
                raise gr.Error(f"run: cannot load the settings of {name!r} ({exc})") from None
            for note in notes:  # an image that is gone: the rest of the settings still load
                gr.Warning(note)
            return _form_values(form)

        def _form_values(form: GenerationForm) -> list[Any]:
            timeline = sorted(form.prompts.items())
            if len(timeline) > TIMELINE_ROWS:
                gr.Warning(f"the run has {len(timeline)} prompts; the form shows the first {TIMELINE_ROWS} "
                           f"(run its config file with the CLI for all of them)")
                timeline = timeline[:TIMELINE_ROWS]
            count = max(2, len(timeline))
            padded = timeline + [(None, "")] * (TIMELINE_ROWS - len(timeline))
            values = [frame for frame, _ in padded] + [text for _, text in padded]
            values += [(getattr(form, name) or None) if name in FORM_IMAGES else getattr(form, name)
                       for name in field_names]
            return [*values, *(gr.update(visible=i < count) for i in range(TIMELINE_ROWS)), count]

        def add_prompt_row(count: int) -> list[Any]:
            count = min(TIMELINE_ROWS, count + 1)
            return [*(gr.update(visible=i < count) for i in range(TIMELINE_ROWS)), count]

        def remove_prompt_row(count: int) -> list[Any]:
            count = max(1, count - 1)
            hidden_rows = range(count, TIMELINE_ROWS)  # cleared, so a hidden row never reaches the run
            return [*(gr.update(visible=i < count) for i in range(TIMELINE_ROWS)),
                    *(gr.update(value=None) if i in hidden_rows else gr.update() for i in range(TIMELINE_ROWS)),
                    *(gr.update(value="") if i in hidden_rows else gr.update() for i in range(TIMELINE_ROWS)), count]

        settable = sorted({name for settings in EMBEDDED_MODEL_SETTINGS.values() for name in settings})

        def choose_model(name: str | None) -> list[Any]:
            """An embedded model chosen: the frames, size, steps and engine it was made for."""
            settings = embedded_model_settings(name or "")
            return [gr.update(value=settings[n]) if n in settings else gr.update() for n in settable]

        model.input(choose_model, model, [by_field[name] for name in settable], queue=False)
        add_row.click(add_prompt_row, shown, [*row_boxes, shown], queue=False)
        remove_row.click(remove_prompt_row, shown, [*row_boxes, *starts, *prompts, shown], queue=False)
        generate.click(generate_from_form, form_inputs, results, validator=validate, concurrency_id=GENERATION,
                       concurrency_limit=1, show_progress="minimal", show_progress_on=[status], api_visibility="private")
        cancel.click(lambda: "**cancelling**: stopping every rank" if studio.cancel(wait=False) else "nothing is running",
                     None, status, queue=False)
        resume.click(resume_chosen, chosen, results, concurrency_id=GENERATION, concurrency_limit=1,
                     show_progress="minimal", show_progress_on=[status], api_visibility="private")
        refresh.click(refresh_gallery, None, [gallery, chosen], queue=False)
        show.click(show_run, chosen, results, queue=False)
        use.click(use_settings, chosen, [*form_inputs, *row_boxes, shown], queue=False)

        app.load(refresh_gallery, None, [gallery, chosen], queue=False)  # each page load sees the runs of now
        _api_endpoint(studio, start)
    return app


def _gallery_html(records: list[RunRecord], studio: Studio | None = None) -> str:
    """The past runs as a table, one row each, with the contact sheet when there is one."""
    if not records:
        return "<p>No runs yet under this server's base_path.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *GALLERY_COLUMNS])
    body = []
    for record in records:
        sheet = studio.servable(record.contact_sheet) if studio is not None else None
        thumb = (f'<img src="/gradio_api/file={urllib.parse.quote(sheet)}" alt="contact sheet" '
                 'style="height:48px;max-width:160px;object-fit:cover">' if sheet else "")
        cells = "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in record.row())
        body.append(f'<tr data-run="{html.escape(record.name)}" data-status="{html.escape(record.status)}">'
                    f"<td>{thumb}</td>{cells}</tr>")
    return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _api_endpoint(studio: Studio, start: GenerationForm) -> None:
    """The ``generate`` endpoint: hidden inputs whose names and defaults are the API's."""

    def generate(prompts: str, num_frames: int, height: int, width: int, steps: int, devices: str, seed: int,
                 guidance_scale: float, negative_prompt: str, transition_frames: int, keyframe_mode: str,
                 scheduler: str, model: str, preset: str, loop: bool, checkpoint_every: int,
                 image: str | None = None, last_image: str | None = None,
                 progress: gr.Progress = gr.Progress()) -> tuple[str | None, dict[str, Any]]:
        """Generate a video; returns the MP4 and the run's sidecar (JSON). ``image``, ``last_image``:
        image-to-video models' first and last frames (``gradio_client.handle_file(path)``; None: none)."""
        try:
            form = form_from_values(parse_timeline(prompts, int(num_frames or 0)), {
                "num_frames": num_frames, "height": height, "width": width, "steps": steps, "devices": devices,
                "seed": seed, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt,
                "transition_frames": transition_frames, "keyframe_mode": keyframe_mode, "scheduler": scheduler, "model": model, "preset": preset,
                "loop": loop, "checkpoint_every": checkpoint_every, "image": image, "last_image": last_image,
                # the server's --config engine settings go with its preset choice
                "engine_json": start.engine_json if preset == start.preset else ""})
            job, name = studio.start(form)
        except FormError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        for state in studio.follow(job):
            if state.steps:
                progress((state.step, state.steps), desc=state.describe())
        outcome = studio.finish(job, name)
        if outcome.status != "done" or outcome.record is None:
            raise gr.Error(outcome.message, print_exception=False)
        return studio.servable(outcome.record.video), outcome.record.sidecar or {}

    hidden = dict(visible=False)
    inputs = [
        gr.Textbox(json.dumps({str(k): v for k, v in sorted(start.prompts.items())}), **hidden),
        gr.Number(start.num_frames, precision=0, **hidden), gr.Number(start.height, precision=0, **hidden),
        gr.Number(start.width, precision=0, **hidden), gr.Number(start.steps, precision=0, **hidden),
        gr.Textbox(start.devices, **hidden), gr.Number(start.seed, precision=0, **hidden),
        gr.Number(start.guidance_scale, **hidden), gr.Textbox(start.negative_prompt, **hidden),
        gr.Number(start.transition_frames, precision=0, **hidden), gr.Textbox(start.keyframe_mode, **hidden),
        gr.Textbox(start.scheduler, **hidden),
        gr.Textbox(start.model, **hidden), gr.Textbox(start.preset, **hidden), gr.Checkbox(start.loop, **hidden),
        gr.Number(start.checkpoint_every, precision=0, **hidden),
        gr.Image(None, type="filepath", **hidden), gr.Image(None, type="filepath", **hidden),  # the API's own files
    ]
    outputs = [gr.Video(**hidden), gr.JSON(**hidden)]
    trigger = gr.Button(**hidden)
    trigger.click(generate, inputs, outputs, api_name="generate", concurrency_id=GENERATION, concurrency_limit=1)
