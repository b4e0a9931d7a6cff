"""The allocator setting the CLI applies (sfn_deploy/allocator.py): set on glibc Linux, skipped when asked."""
import sys

import pytest

from sfn_deploy.allocator import tune


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_threshold_is_set_on_linux_and_left_alone_when_asked(monkeypatch):
    assert tune() is True
    monkeypatch.setenv("SFN_MALLOC", "default")
    assert tune() is False
