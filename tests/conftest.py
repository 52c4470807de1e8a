"""Settings shared by the whole suite.

Property tests draw their shapes from a fixed seed by default, so that a CI failure reproduces
on any machine with the same command; `DCA_HYPOTHESIS_PROFILE=explore` draws fresh examples on
each run (for hunting, not for CI). A test that sets its own `max_examples` keeps it.
"""

from __future__ import annotations

import os

import hypothesis

hypothesis.settings.register_profile("reproducible", deadline=None, derandomize=True,
                                     print_blob=True)
hypothesis.settings.register_profile("explore", deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("DCA_HYPOTHESIS_PROFILE", "reproducible"))
