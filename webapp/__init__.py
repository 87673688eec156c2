"""The doctor's web app (FastAPI): sign in, upload an X-ray, see the result and heatmap, keep studies.

- ``app``: the application factory and its lifespan (migrations, image store, transformer client, retry worker);
- ``routers``: ``health`` (probes, metrics), ``auth`` (sign-in pages), ``studies_api`` (JSON), ``pages`` (HTML);
- ``studies``: store -> score -> retry, queries, feedback; ``inference``: the transformer's v2 REST API;
- ``uploads``: what an upload must be, DICOM de-identification; ``storage``: folder or S3;
- ``accounts``: users, passwords, tokens, sessions, sign-in limits; ``models`` + ``migrations``: the schema;
- ``report``: the PDF; ``cli``: ``pneumoscope web|db|users|studies``; ``settings``: ``PNEUMOSCOPE_*``.

No torch, kserve or onnxruntime here: the app reaches the model only over HTTP.
"""
