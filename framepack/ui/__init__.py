"""The web UI (Gradio) on the render service: a client of its REST API.

    client.py   the REST API over HTTP, files fetched into a cache folder
    views.py    what the pages show, as plain functions of job records and form values
    app.py      the Gradio app and ``mount_ui`` for ``framepack serve``
"""
