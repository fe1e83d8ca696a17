"""The environment report: versions against constraints.txt, and the known-bad combinations."""

from dist_glm.runtime import doctor


def test_constraints_pin_every_package_the_report_checks():
    pins = doctor.tested_versions()
    assert set(doctor.PACKAGES) <= set(pins), set(doctor.PACKAGES) - set(pins)
    assert all(v and "+" not in v for v in pins.values())  # a release, not a local build label


def test_versions_are_compared_by_release_not_build_label(tmp_path):
    pins = tmp_path / "c.txt"
    pins.write_text("# comment\ntorch==2.13.0\ndeepspeed==0.1.0\n")
    rows = {name: ok for name, _, _, ok in doctor.version_rows(doctor.tested_versions(pins))}
    assert rows["torch"] is True  # 2.13.0+cpu is the 2.13.0 release
    assert rows["deepspeed"] is False and rows["transformers"] is False  # differs / not pinned


def test_known_bad_combinations_name_the_fix():
    rows = [(name, "0.19.8" if name == "deepspeed" else "5.24.0", None, True) for name in doctor.PACKAGES]
    assert doctor.known_problems(rows, set()) == []
    bad = dict((r[0], r) for r in rows)
    bad["transformers"] = ("transformers", "6.0.0", "5.24.0", False)
    bad["deepspeed"] = ("deepspeed", "0.20.1", "0.19.8", False)
    bad["bitsandbytes"] = ("bitsandbytes", None, "0.50.2", False)
    problems = doctor.known_problems(list(bad.values()), set())
    assert len(problems) == 3
    assert all("pip install" in p for p in problems)


def test_report_and_summary_line():
    report = doctor.report()
    for name in doctor.PACKAGES:
        assert f"\n{name:<14}" in report
    assert "accelerator:" in report and "DeepSpeed op builds:" in report
    assert doctor.summary_line().startswith("environment: torch ")


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch):
    # Every LLaMA-Factory recipe sets bf16: true; on a CPU that emulates it a step takes ~50x longer.
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"avx2", "avx512f"})
    warning = doctor.slow_bf16_warning()
    assert warning.startswith("WARNING: bf16=true on a CPU without native bf16") and "--bf16=false" in warning
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert doctor.slow_bf16_warning() is None
