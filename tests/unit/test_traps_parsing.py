"""How lightningd's command line and config files load a plugin (app/traps.py), without a
lightningd: the forms lightningd accepts, and the answers that decide the warning."""

from __future__ import annotations

from pathlib import Path

from pibackup.app.traps import how_loaded, is_lightningd, plugin_line_warning


def setup(tmp_path: Path) -> tuple:
    top = tmp_path / "lightning"
    net = top / "bitcoin"
    net.mkdir(parents=True)
    plugin = tmp_path / "lib" / "pibackup.py"
    plugin.parent.mkdir()
    plugin.write_text("")
    return top, net, str(plugin)


def test_each_way_of_naming_the_plugin(tmp_path):
    top, net, plugin = setup(tmp_path)
    lightningd = ["/usr/bin/lightningd", f"--lightning-dir={top}"]
    assert how_loaded(plugin, str(net), lightningd + [f"--important-plugin={plugin}"]).how == "important-plugin"
    assert how_loaded(plugin, str(net), lightningd + ["--important-plugin", plugin]).how == "important-plugin"
    assert how_loaded(plugin, str(net), lightningd + ["--plugin", plugin]).how == "plugin"
    assert how_loaded(plugin, str(net), lightningd + ["--plugin=pibackup.py"]).how == "plugin"  # relative: its name
    assert how_loaded(plugin, str(net), lightningd + [f"--plugin-dir={Path(plugin).parent}"]).how == "plugin-dir"
    assert how_loaded(plugin, str(net), lightningd + ["--plugin=/other/summary.py"]) is None
    # important wins over a plain line elsewhere (lightningd loads it once, as important)
    (top / "config").write_text(f"plugin={plugin}\n")
    assert how_loaded(plugin, str(net), lightningd + [f"--important-plugin={plugin}"]).how == "important-plugin"


def test_config_files_where_lightningd_reads_them(tmp_path):
    top, net, plugin = setup(tmp_path)
    (net / "config").write_text(f"# a comment\nimportant-plugin={plugin}\n")
    assert how_loaded(plugin, str(net), ["lightningd"]).where == str(net / "config")
    conf = tmp_path / "elsewhere.conf"
    conf.write_text("include more/plugins.conf\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "plugins.conf").write_text(f"plugin={plugin}\n")
    found = how_loaded(plugin, str(net), ["lightningd", f"--conf={conf}"])
    assert found.how == "plugin" and found.where == str(tmp_path / "more" / "plugins.conf")


def test_includes_that_loop_end(tmp_path):
    top, net, plugin = setup(tmp_path)
    (top / "config").write_text("include config\n")
    assert how_loaded(plugin, str(net), ["lightningd"]) is None


def test_no_warning_when_the_parent_is_not_lightningd(tmp_path):
    top, net, plugin = setup(tmp_path)
    assert not is_lightningd(["python3", "driver.py"]) and is_lightningd(["/usr/local/bin/lightningd"])
    assert plugin_line_warning(plugin, str(net), ["python3", f"--plugin={plugin}"]) is None
    w = plugin_line_warning(plugin, str(net), ["lightningd", f"--plugin={plugin}"])
    assert w is not None and "not important-plugin=" in w
