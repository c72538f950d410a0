"""Work over collections: feature extraction of image folders into stores, streaming index builds,
the end-to-end pipeline (:func:`d2r.workflows.pipeline.run`), the HTML report and the synthetic demo."""
