"""The web UI: a Gradio app on the render service (``framepack serve`` mounts it at ``/``).

Everything goes through the service's REST API (framepack.ui.client), so jobs
keep running and stay queued when the browser closes and a reload shows them
again. Tabs: Generate (every setting, the timed-prompt sections and the memory
plan live, progress with a latent preview and the partial video, Stop and
Resume), Queue, Outputs, Presets."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from framepack.errors import UserError
from framepack.ui import views
from framepack.ui.client import ApiClient, ApiError

NOW_PRIORITY = 1000  # "Generate now": ahead of everything queued
CSS = """
.fp-bar { margin: 6px 0; }
.fp-bar-label { font-size: 0.85em; }
.fp-bar-track { background: var(--neutral-200); border-radius: 4px; height: 10px; overflow: hidden; }
.fp-bar-fill { background: var(--color-accent); height: 100%; transition: width 0.4s; }
.fp-error { color: var(--error-text-color); margin-top: 6px; }
"""

HELP = {
    "image": "The first frame. Leave it empty for text-to-video (the start is a blank frame).",
    "prompt": "What happens. Timed: [0s: a man waves] [2s-4s: he jumps] [4s: he spins].",
    "negative_prompt": "What to avoid; read only with CFG above 1.",
    "seconds": "Length of the video.",
    "seed": "Same seed and settings: the same video.",
    "steps": "Sampling steps per section; 25 is the original's.",
    "window": "Latent frames per section (9: 33 video frames); FramePack's default is 9.",
    "gs": "Distilled guidance, 10 in the original.",
    "cfg": "Real classifier-free guidance; 1 = off (one transformer call per step).",
    "rs": "CFG rescale, 0 = off.",
    "variant": "original: the inverted anti-drifting model; f1: forward-only FramePack-F1.",
    "resolution": "Picks the nearest of FramePack's size buckets to the image.",
    "size": "Exact HEIGHTxWIDTH (multiples of 16) instead of the bucket, e.g. 640x608.",
    "prompt_blend": "Timed prompts: blend each change over this many sections before it (0: switch).",
    "cache": "Skip transformer calls that change little: faster, a little less faithful.",
    "cache_threshold": "Higher skips more.",
    "profile": "Hardware profile; auto picks the one that matches this machine.",
    "model": "A model this service offers (framepack serve --allow-model); empty: the service's default.",
}


def lora_names() -> list[str]:
    """LoRA files in the LoRA folder (FRAMEPACK_LORA_DIR, as `framepack loras` lists it)."""
    from framepack.models.lora_formats import lora_dir

    folder = lora_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.glob("*.safetensors"))


def profile_choices() -> tuple[list[str], str]:
    """("auto" + every profile, why auto picks what it picks on this machine)."""
    from framepack.engine.profiles import load_profiles, select_profile
    from framepack.hardware import detect_hardware

    profiles = load_profiles()
    try:
        selection = select_profile(profiles, detect_hardware())
        why = f"auto = **{selection.profile.name}**: {selection.why}"
    except UserError as exc:
        why = f"auto: {exc}"
    return ["auto", *sorted(profiles.profiles)], why


def _upload_path(value) -> Path | None:
    """A gr.File's value (a path, or a file object with .name, by Gradio version) as a path."""
    if not value:
        return None
    return Path(value if isinstance(value, str) else value.name)


@functools.lru_cache(maxsize=128)
def _plan_text(model, variant, seconds, window, resolution, size, image_size, profile, extend=None) -> str:
    """The memory plan line; cached, as the form asks again on every change."""
    from framepack.pipeline.memory_plan import plan_for

    try:
        view = plan_for(model=model, variant=variant, seconds=seconds, window=window, resolution=resolution,
                        size=size, image_size=image_size, profile=profile, extend=extend)
    except (UserError, ValueError, OSError) as exc:
        return f"Memory plan: {exc}"
    mark = "fits" if view.fits else "does not fit"
    return (f"**Memory plan** ({view.profile}, {view.height}x{view.width}, {view.sections} sections, "
            f"{view.frames} frames, {mark}): {view.message}")


def build_ui(client: ApiClient, *, default_model: str | None = None, default_profile: str | None = None,
             poll_s: float = 1.0, check_model: Callable[[str], None] | None = None) -> gr.Blocks:
    """The app. ``default_model`` / ``default_profile``: what the service's
    workers use for a job that names none (their --model and --profile), so the
    memory plan is the plan of the job that will run. ``check_model``: the
    service's rule for a model a job names (UserError if it may not); the plan
    reads no model it refuses."""
    profiles, profile_why = profile_choices()
    if default_profile:
        profile_why = f"auto = **{default_profile}**: the service's workers run jobs that name none with it"
    with gr.Blocks(title="framepack") as ui:
        gr.Markdown("# framepack\nOne image and a prompt into a long video (FramePack). Jobs run in the "
                    "service's queue: close the page and they go on.")
        current = gr.State(None)  # the job the Generate tab follows
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(min_width=320):
                        image = gr.Image(label="Start image", type="filepath", sources=["upload", "clipboard"],
                                         elem_id="start-image")
                        gr.Markdown(HELP["image"])
                        with gr.Accordion("End frame and keyframes", open=False, elem_id="end-frame-box"):
                            end_image = gr.Image(label="End image", type="filepath", elem_id="end-image")
                            end_strength = gr.Slider(0, 1, value=1.0, step=0.05, label="End strength",
                                                     info="How strongly the end image pulls the video's end.")
                            image_embeds = gr.Radio(["start", "linear", "mean"], value="linear", label="Image embedding",
                                                    info="Which image each section sees: the start, a blend moving "
                                                         "from the end to the start, or their mean.")
                            keyframes = gr.File(label="Keyframe images", file_count="multiple", file_types=["image"])
                            keyframe_times = gr.Textbox(label="Keyframe times (s)", placeholder="1.5, 3",
                                                        info="One time per keyframe image, in seconds of the video.")
                            blank = gr.Dropdown(["gray", "black", "white", "noise"], value="gray",
                                                label="Blank start (text-to-video)",
                                                info="The first frame when no start image is given.")
                        with gr.Accordion("Extend a video", open=False, elem_id="extend-box"):
                            extend_video = gr.File(label="Video to continue", file_types=["video"],
                                                   elem_id="extend-video")
                            gr.Markdown("Leave the start image empty: the new part continues this video's last "
                                        "frames for *Seconds* more, and the output holds both (docs/controls.md).")
                        prompt = gr.Textbox(label="Prompt", lines=3, info=HELP["prompt"], elem_id="prompt")
                        sections_view = gr.Markdown(views.prompt_sections("", 5, 9), elem_id="prompt-sections")
                        negative = gr.Textbox(label="Negative prompt", info=HELP["negative_prompt"], visible=False)
                        with gr.Row():
                            seconds = gr.Slider(1, 120, value=views.DEFAULTS["seconds"], step=0.1, label="Seconds",
                                                info=HELP["seconds"], elem_id="seconds")
                            seed = gr.Number(value=views.DEFAULTS["seed"], precision=0, label="Seed", info=HELP["seed"])
                            dice = gr.Button("Random seed", size="sm")
                        with gr.Accordion("Sampling", open=False, elem_id="sampling-box"):
                            steps = gr.Slider(1, 100, value=25, step=1, label="Steps", info=HELP["steps"], elem_id="steps")
                            window = gr.Slider(1, 33, value=9, step=1, label="Window", info=HELP["window"], elem_id="window-slider")
                            gs = gr.Slider(1, 32, value=10, step=0.5, label="Distilled guidance", info=HELP["gs"])
                            cfg = gr.Slider(1, 32, value=1, step=0.5, label="CFG", info=HELP["cfg"])
                            rs = gr.Slider(0, 1, value=0, step=0.05, label="CFG rescale", info=HELP["rs"])
                            variant = gr.Radio(["original", "f1"], value="original", label="Model", info=HELP["variant"])
                            resolution = gr.Dropdown([320, 480, 640, 720, 960], value=640, label="Resolution",
                                                     info=HELP["resolution"])
                            size = gr.Textbox(label="Exact size", placeholder="HEIGHTxWIDTH", info=HELP["size"],
                                              elem_id="size")
                            blend = gr.Slider(0, 10, value=0, step=1, label="Prompt blend", info=HELP["prompt_blend"])
                        with gr.Accordion("Speed and hardware", open=False, elem_id="speed-box"):
                            cache = gr.Dropdown(["none", "teacache", "magcache", "first_block"], value="none",
                                                label="Step cache", info=HELP["cache"])
                            threshold = gr.Slider(0.01, 0.5, value=0.15, step=0.01, label="Cache threshold",
                                                  info=HELP["cache_threshold"])
                            loras = gr.Dropdown(lora_names(), multiselect=True, label="LoRAs",
                                                info="From the LoRA folder (framepack loras lists it).")
                            lora_scales = gr.Textbox(label="LoRA scales", placeholder="1.0, 0.8",
                                                     info="One scale per LoRA chosen, in order; empty: 1.0 each.")
                            profile = gr.Dropdown(profiles, value="auto", label="Profile", info=HELP["profile"])
                            gr.Markdown(profile_why, elem_id="profile-why")
                            model = gr.Textbox(label="Model", info=HELP["model"], elem_id="model")
                        plan_view = gr.Markdown("", elem_id="memory-plan")
                        with gr.Row():
                            queue_button = gr.Button("Add to queue", variant="secondary", elem_id="add-to-queue")
                            now_button = gr.Button("Generate now", variant="primary", elem_id="generate-now")
                    with gr.Column(min_width=320):
                        message = gr.Markdown("", elem_id="message")
                        progress = gr.HTML(views.progress_html(None), elem_id="progress")
                        preview = gr.Image(label="Latest latent preview", interactive=False, elem_id="preview",
                                           height=240)
                        video = gr.Video(label="Video (the partial one after each section)", interactive=False,
                                         elem_id="video")
                        with gr.Row():
                            stop_button = gr.Button("Stop (keeps the checkpoint)", variant="stop", elem_id="stop")
                            resume_button = gr.Button("Resume", elem_id="resume")

            with gr.Tab("Queue", id="queue"):
                queue_table = gr.Dataframe(headers=views.QUEUE_HEADERS, value=[], interactive=False,
                                           elem_id="queue-table", wrap=True)
                with gr.Row():
                    selected = gr.Textbox(label="Selected job", info="Click a row, or type an id.", elem_id="selected-job")
                    priority = gr.Number(value=0, precision=0, label="Priority", info="Higher runs first.")
                with gr.Row():
                    up_button = gr.Button("Move up", size="sm")
                    down_button = gr.Button("Move down", size="sm")
                    priority_button = gr.Button("Set priority", size="sm")
                    cancel_button = gr.Button("Cancel", size="sm", variant="stop", elem_id="queue-cancel")
                    q_resume_button = gr.Button("Resume", size="sm", elem_id="queue-resume")
                    retry_button = gr.Button("Retry", size="sm")
                    edit_button = gr.Button("Duplicate and edit", size="sm", elem_id="duplicate")
                    follow_button = gr.Button("Follow in Generate", size="sm")
                queue_message = gr.Markdown("", elem_id="queue-message")

            with gr.Tab("Outputs", id="outputs"):
                finished = gr.Dropdown([], label="Finished video", elem_id="finished")
                out_video = gr.Video(label="Video", interactive=False, elem_id="output-video")
                out_meta = gr.Markdown("", elem_id="output-metadata")
                with gr.Row():
                    load_button = gr.Button("Load settings", elem_id="load-settings")
                    download = gr.File(label="Download", interactive=False)

            with gr.Tab("Presets", id="presets"):
                preset_name = gr.Textbox(label="Preset name", elem_id="preset-name")
                preset_list = gr.Dropdown([], label="Saved presets", elem_id="preset-list")
                with gr.Row():
                    save_preset = gr.Button("Save the Generate tab's settings", elem_id="save-preset")
                    load_preset = gr.Button("Load into Generate", elem_id="load-preset")
                    delete_preset = gr.Button("Delete", variant="stop")
                preset_message = gr.Markdown("")

        form = [prompt, negative, seconds, seed, steps, window, gs, cfg, rs, variant, resolution, size, blend, cache,
                threshold, profile, model]
        form_keys = ["prompt", "negative_prompt", "seconds", "seed", "steps", "window", "gs", "cfg", "rs", "variant",
                     "resolution", "size", "prompt_blend", "cache", "cache_threshold", "profile", "model"]
        extra = [end_strength, image_embeds, blank, loras, lora_scales]

        def collect(values) -> dict[str, Any]:
            form_values = dict(zip(form_keys, values[: len(form)]))
            end_s, embeds, blank_v, lora_v, scales_v = values[len(form):]
            settings = views.settings_from_form(form_values)
            return settings, (end_s, embeds, blank_v, lora_v, scales_v)

        # ------------------------------------------------------------ live views

        def live_sections(text, secs, win, blend_n):
            return views.prompt_sections(text, secs, win, blend_n)

        for trigger in (prompt, seconds, window, blend):
            trigger.change(live_sections, [prompt, seconds, window, blend], sections_view, show_progress="hidden",
                           trigger_mode="always_last")

        def live_plan(img, secs, win, res, size_text, var, prof, mdl, video):
            from framepack.pipeline.settings import parse_size

            try:
                image_size = None
                if img:
                    from PIL import Image

                    with Image.open(img) as opened:
                        image_size = (opened.height, opened.width)
                exact = parse_size(size_text) if (size_text or "").strip() else None
                if (mdl or "").strip() and check_model is not None:
                    check_model(mdl.strip())  # the plan reads only a model the service offers
            except (UserError, ValueError, OSError) as exc:
                return f"Memory plan: {exc}"
            chosen = default_profile if prof == "auto" else prof
            return _plan_text((mdl or "").strip() or default_model, var, float(secs), int(win), int(res), exact,
                              image_size, chosen, None if img else _upload_path(video))

        plan_inputs = [image, seconds, window, resolution, size, variant, profile, model, extend_video]
        for trigger in plan_inputs:
            trigger.change(live_plan, plan_inputs, plan_view, show_progress="hidden", trigger_mode="always_last")
        ui.load(live_plan, plan_inputs, plan_view, show_progress="hidden")

        cfg.change(lambda c: gr.update(visible=float(c) > 1.0), cfg, negative)
        dice.click(lambda: random.randrange(2**31), None, seed)

        # ------------------------------------------------------------ submit and follow

        def submit(priority_value, img, end_img, key_files, key_times, ext_file, *values):
            try:
                settings, (end_s, embeds, blank_v, lora_v, scales_v) = collect(values)
                if end_img:
                    settings["end_strength"] = float(end_s)
                    settings["image_embeds"] = embeds
                if not img and not ext_file:
                    settings["blank"] = blank_v
                if lora_v:
                    scales = [s.strip() for s in (scales_v or "").split(",") if s.strip()]
                    if scales and len(scales) != len(lora_v):
                        raise UserError(f"LoRA scales: {len(scales)} given for {len(lora_v)} LoRA(s)")
                    settings["loras"] = [[name, float(scales[i]) if scales else 1.0] for i, name in enumerate(lora_v)]
                files = [_upload_path(f) for f in (key_files or [])]
                if files:
                    times = [t.strip() for t in (key_times or "").split(",") if t.strip()]
                    if len(times) != len(files):
                        raise UserError(f"keyframes: {len(files)} image(s) but {len(times)} time(s)")
                    settings["keyframes"] = [float(t) for t in times]
                job_id = client.submit(settings, image=Path(img) if img else None,
                                       end_image=Path(end_img) if end_img else None, keyframes=files,
                                       extend=_upload_path(ext_file), priority=priority_value)
            except (UserError, ValueError) as exc:
                return gr.update(), f"**Not submitted:** {exc}", gr.update()
            return job_id, f"Job **{job_id}** queued.", views.progress_html(client.job(job_id))

        inputs = [image, end_image, keyframes, keyframe_times, extend_video, *form, *extra]
        queue_button.click(lambda *v: submit(0, *v), inputs, [current, message, progress])
        now_button.click(lambda *v: submit(NOW_PRIORITY, *v), inputs, [current, message, progress])

        def follow(job_id):
            if not job_id:
                return gr.update(), gr.update(), gr.update()
            try:
                job = client.job(job_id)
            except ApiError as exc:
                return f'<div data-testid="progress">{exc}</div>', gr.update(), gr.update()
            p = job.get("progress") or {}
            preview_path = client.fetch(job_id, "preview.png") if p.get("preview") else None
            name = views.video_name(job) if job.get("status") == "done" else p.get("partial")
            video_path = client.fetch(job_id, name) if name else None
            return (views.progress_html(job), str(preview_path) if preview_path else gr.update(),
                    str(video_path) if video_path else gr.update())

        timer = gr.Timer(poll_s)
        timer.tick(follow, current, [progress, preview, video], show_progress="hidden")

        def stop(job_id):
            if not job_id:
                return "No job to stop."
            try:
                result = client.cancel(job_id)
            except ApiError as exc:
                return f"**Not stopped:** {exc}"
            return f"Job **{job_id}**: {result.get('status')} (its checkpoint is kept; Resume continues it)."

        def resume(job_id):
            if not job_id:
                return "No job to resume."
            try:
                client.resume(job_id)
            except ApiError as exc:
                return f"**Not resumed:** {exc}"
            return f"Job **{job_id}** queued again; it continues from its last finished section."

        stop_button.click(stop, current, message)
        resume_button.click(resume, current, message)

        # ------------------------------------------------------------ queue tab

        def refresh_queue():
            try:
                jobs = client.jobs()
            except ApiError as exc:
                return gr.update(), f"**{exc}**", gr.update()
            done = [(f"{j['id']}: {views._short(str((j.get('settings') or {}).get('prompt', '')), 40)}", j["id"])
                    for j in jobs if j.get("status") == "done"]
            return views.queue_rows(jobs), "", gr.update(choices=done)

        queue_timer = gr.Timer(2 * poll_s)
        queue_timer.tick(refresh_queue, None, [queue_table, queue_message, finished], show_progress="hidden")
        ui.load(refresh_queue, None, [queue_table, queue_message, finished])

        def pick(evt: gr.SelectData, table):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            try:
                return table.iloc[row, 0] if hasattr(table, "iloc") else table[row][0]
            except (IndexError, KeyError):
                return gr.update()

        queue_table.select(pick, queue_table, selected)

        def act(action, job_id, value=None):
            job_id = (job_id or "").strip()
            if not job_id:
                return "Select a job first."
            try:
                if action == "up" or action == "down":
                    job = client.job(job_id)
                    position = (job.get("position") or 0) + (-1 if action == "up" else 1)
                    client.patch(job_id, position=max(0, position))
                elif action == "priority":
                    client.patch(job_id, priority=int(value or 0))
                elif action == "cancel":
                    client.cancel(job_id)
                elif action == "resume":
                    client.resume(job_id)
                elif action == "retry":
                    client.retry(job_id)
            except (ApiError, ValueError) as exc:
                return f"**{action}: {exc}**"
            return f"{action}: job **{job_id}** done."

        up_button.click(lambda j: act("up", j), selected, queue_message)
        down_button.click(lambda j: act("down", j), selected, queue_message)
        priority_button.click(lambda j, v: act("priority", j, v), [selected, priority], queue_message)
        cancel_button.click(lambda j: act("cancel", j), selected, queue_message)
        q_resume_button.click(lambda j: act("resume", j), selected, queue_message)
        retry_button.click(lambda j: act("retry", j), selected, queue_message)

        def fill_form(settings: dict):
            values = views.form_from_settings(settings)
            return [values[k] for k in form_keys]

        def duplicate(job_id):
            try:
                job = client.job((job_id or "").strip())
            except ApiError as exc:
                return [gr.update()] * len(form) + [f"**{exc}**", gr.Tabs()]
            return fill_form(job.get("settings") or {}) + [f"Settings of **{job['id']}** loaded; change them and "
                                                           "submit (the start image is not copied).",
                                                           gr.Tabs(selected="generate")]

        edit_button.click(duplicate, selected, [*form, message, tabs])
        follow_button.click(lambda j: ((j or "").strip() or None, gr.Tabs(selected="generate")), selected,
                            [current, tabs])

        # ------------------------------------------------------------ outputs tab

        def show_output(job_id):
            if not job_id:
                return gr.update(), "", gr.update()
            try:
                job = client.job(job_id)
                name = views.video_name(job)
                path = client.fetch(job_id, name) if name else None
            except ApiError as exc:
                return gr.update(), f"**{exc}**", gr.update()
            return (str(path) if path else None), views.metadata_text(job), (str(path) if path else None)

        finished.change(show_output, finished, [out_video, out_meta, download])

        def load_settings(job_id):
            if not job_id:
                return [gr.update()] * len(form) + ["Pick a finished video first.", gr.Tabs()]
            return duplicate(job_id)

        load_button.click(load_settings, finished, [*form, message, tabs])

        # ------------------------------------------------------------ presets tab

        def refresh_presets():
            try:
                return gr.update(choices=sorted(client.presets()))
            except ApiError:
                return gr.update()

        ui.load(refresh_presets, None, preset_list)

        def save(name, *values):
            name = (name or "").strip()
            if not name:
                return "Give the preset a name.", gr.update()
            try:
                settings, _ = collect(list(values) + [None] * len(extra))
                client.put_preset(name, settings)
            except (UserError, ValueError) as exc:
                return f"**Not saved:** {exc}", gr.update()
            return f"Preset **{name}** saved.", gr.update(choices=sorted(client.presets()), value=name)

        save_preset.click(save, [preset_name, *form], [preset_message, preset_list])

        def load(name):
            presets = client.presets()
            if name not in presets:
                return [gr.update()] * len(form) + ["Pick a saved preset.", gr.Tabs()]
            return fill_form(presets[name]) + [f"Preset **{name}** loaded.", gr.Tabs(selected="generate")]

        load_preset.click(load, preset_list, [*form, message, tabs])

        def remove(name):
            try:
                client.delete_preset(name)
            except ApiError as exc:
                return f"**{exc}**", gr.update()
            return f"Preset **{name}** deleted.", gr.update(choices=sorted(client.presets()), value=None)

        delete_preset.click(remove, preset_list, [preset_message, preset_list])
    return ui


def mount_ui(app, client: ApiClient, *, token: str | None = None, path: str = "/", default_model: str | None = None,
             default_profile: str | None = None, check_model: Callable[[str], None] | None = None):
    """Mount the UI on the service's FastAPI app. With a token, a login page
    asks for it (any user name, the token as the password)."""
    import hmac

    def token_matches(username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), token.encode())

    auth = token_matches if token else None
    ui = build_ui(client, default_model=default_model, default_profile=default_profile, check_model=check_model)
    return gr.mount_gradio_app(app, ui, path=path, auth=auth, css=CSS,
                               auth_message="The token from the service's --auth file.",
                               allowed_paths=[str(client.cache_dir)], footer_links=[])
