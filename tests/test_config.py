"""The declarative config: TOML keys validated by name, flags override, effective record stored."""
import pytest

from sfn_deploy.config import load_config
from sfn_deploy.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "sfn.toml"
    p.write_text(text)
    return str(p)


def test_file_values_and_flag_overrides(tmp_path):
    path = write(tmp_path, 'levels = 6\npercentile = 0.5\nfire = "linear"\nmax-drop = 0.3\n')
    cfg = load_config(path, {"levels": 4})
    assert cfg.levels == 4 and cfg.percentile == 0.5 and cfg.fire == "linear" and cfg.max_drop == 0.3
    assert cfg.tune is True


def test_convert_table_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "[convert]\nscale = 0.25\n"), {})
    assert cfg.scale == 0.25 and cfg.tune is False


@pytest.mark.parametrize("text,key", [
    ("level = 3", "level"),
    ('fire = "cubic"', "fire"),
    ("scale = 1.5", "scale"),
    ('trials = "many"', "trials"),
    ("percentile = 100", "percentile"),
])
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        load_config(write(tmp_path, text), {})


def test_scale_and_budget_conflict():
    with pytest.raises(UserError, match="scale"):
        load_config("", {"scale": 0.3, "max_drop": 0.5})


def test_bad_toml(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(write(tmp_path, "levels = = 3"), {})
