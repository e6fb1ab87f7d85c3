"""gpupool's provider adapters: local, kaggle and colab (found through entry points)."""

import logging as _logging

# A library's loggers print nothing until the application configures logging (the logging
# HOWTO's advice for libraries); the CLI shows warnings on stderr.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
