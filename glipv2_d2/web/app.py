"""The Gradio page of the web demo: image (upload or built-in), task, prompt, threshold and top-k in;
the drawn picture, a table of detections, the JSON record to download and a message out. Offline by
construction: no analytics, system fonts instead of the theme's web fonts, nothing from a CDN."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

from .defaults import ModelChoice, synthetic_examples  # noqa: E402
from .session import TABLE_COLUMNS, DemoRequest, DemoResult, DemoSession  # noqa: E402
from .tasks import TASKS  # noqa: E402

__all__ = ["INSTALL_HINT", "MAX_UPLOAD", "build_app", "import_gradio", "launch_app"]

INSTALL_HINT = "the web demo needs Gradio: pip install -r requirements-web.txt (or make web-demo)"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
MAX_UPLOAD = "50mb"  # Gradio refuses larger uploads with a message on the page


def import_gradio():
    """Gradio, or an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return gradio


def _page_outputs(result: DemoResult) -> tuple:
    return result.picture, result.table, result.json_path, result.message, result.answer


def build_app(session: DemoSession, choice: ModelChoice, builtin_names: list[str]):
    """The gr.Blocks page bound to ``session``; the caller launches it."""
    gr = import_gradio()
    examples = [(f"synthetic {path.name}", str(path)) for path in synthetic_examples()]
    choices = [*examples, *((name, name) for name in builtin_names)]
    with gr.Blocks(title="GLIPv2 demo", analytics_enabled=False) as app:
        gr.Markdown("## GLIPv2 grounding demo\n" + (f"**{choice.note}**" if choice.note else ""), elem_id="note")
        status = gr.Markdown(session.status(), elem_id="status")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
                builtin = gr.Dropdown(choices=choices, value=choices[0][1],
                                      label="...or pick a built-in image (used when nothing is uploaded)",
                                      elem_id="builtin")
                task = gr.Radio(choices=[(t.title, t.key) for t in TASKS[:2]], value="detect", label="Task",
                                elem_id="task")
                prompt = gr.Textbox(label="Prompt", value=choice.example_prompt, placeholder=TASKS[0].prompt_hint,
                                    elem_id="prompt", max_lines=4)
                phrases = gr.Textbox(label="Phrases to ground (optional, comma-separated; default: the caption's "
                                     "noun phrases)", elem_id="phrases")
                threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold", elem_id="threshold")
                top_k = gr.Slider(0, 20, value=0, step=1, label="Top-k boxes per phrase (0: all)", elem_id="top_k")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                answer = gr.Textbox(label="Answer / caption", interactive=False, elem_id="answer")
                picture = gr.Image(label="Detections", type="numpy", interactive=False, elem_id="picture")
                table = gr.Dataframe(headers=TABLE_COLUMNS, label="Detections table", interactive=False,
                                     elem_id="table")
                download = gr.File(label="JSON (glipv2-d2/detections/1)", interactive=False, elem_id="download")

        def refresh(current: str):
            tasks = session.tasks()
            choices = [(t.title, t.key) for t in tasks] or [(t.title, t.key) for t in TASKS[:2]]
            keys = [key for _, key in choices]
            return session.status(), gr.Radio(choices=choices, value=current if current in keys else keys[0])

        def describe(key: str):
            hint = next((t.prompt_hint for t in TASKS if t.key == key), "")
            return gr.Textbox(placeholder=hint, interactive=bool(hint))

        tracker = gr.Progress()  # Gradio fills a handler argument whose default is a Progress

        def submit(file, builtin_name, task_key, prompt_text, phrase_text, score, k, progress=tracker):
            request = DemoRequest(task=task_key, prompt=prompt_text, phrases=phrase_text or "", upload=file,
                                  builtin=builtin_name, score_threshold=float(score), top_k=int(k))
            return _page_outputs(session.run(request, lambda fraction, text: progress(fraction, desc=text)))

        timer = gr.Timer(1.0)
        timer.tick(lambda current: refresh(current) + (gr.Timer(active=not session.wait_until_loaded(0)),),
                   inputs=task, outputs=[status, task, timer])
        task.change(describe, inputs=task, outputs=prompt)
        run.click(submit, inputs=[upload, builtin, task, prompt, phrases, threshold, top_k],
                  outputs=[picture, table, download, message, answer], concurrency_limit=1)
    return app


def launch_app(app, host: str, port: int | None, block: bool = True):
    """Serve the page on host:port (port None: the first free one from 7860) with Gradio's server;
    no share link, no server-side rendering (it would need Node), system fonts only."""
    gr = import_gradio()
    return app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, show_error=True, max_file_size=MAX_UPLOAD,
        ssr_mode=False, prevent_thread_lock=not block, quiet=not block,
        theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS),
    )
