"""Source formats turned into manifests: one module per format, each driving ``aqa.data.convert``."""
