"""The DICOM gateway: films in from a PACS (C-STORE, DICOMweb), results back to it (SR, Secondary Capture, PDF).

One stage per module, as MONAI Deploy's operators: ``storage_scp`` and ``dicomweb_poller`` receive,
``intake`` checks and records what they received (``chest_filter`` decides what is scored), ``score`` calls the
transformer through the web app's storage layer, ``sr_writer``, ``secondary_capture_writer`` and ``pdf_writer``
build the results, ``outbox`` keeps them until ``sender_stow`` or ``sender_cstore`` has delivered them.
No torch, kserve or onnxruntime: the transformer is called over HTTP, as the web app calls it.
"""
