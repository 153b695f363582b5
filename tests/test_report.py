"""``grpo report``: one self-contained report.html of a run or a sweep, checked by parsing it (every image
an inline PNG, the sections and metrics there, completions escaped and coloured by reward), plus the
one-line errors, and a render in a headless browser where one is installed."""

import base64
import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import compose

from grpo_cli.cli import main
from grpo_cli.errors import UserError
from grpo_cli.report import reward_colour, smooth, split_keys, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """What the tests read from a report: images, links, headings, text, inline styles of table rows."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.links, self.headings, self.row_styles, self.texts = [], [], [], [], []
        self.tags, self._heading = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "a":
            self.links.append(a.get("href"))
        elif tag == "tr" and "style" in a:
            self.row_styles.append(a["style"])
        elif tag in ("h1", "h2", "h3"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._heading is not None:
            self._heading += data

    @property
    def text(self):
        return "".join(self.texts)


def _png(data_uri: str) -> bytes:
    assert data_uri.startswith("data:image/png;base64,"), data_uri[:40]
    data = base64.b64decode(data_uri.split(",", 1)[1], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


def _completion(step, index, reward, text="2"):
    return {
        "step": step,
        "index": index,
        "group": index // 2,
        "prompt": "1+1=",
        "completion": text,
        "answer": "2",
        "reward": reward,
        "rewards": {"correct": reward},
        "advantage": 0.5 if reward else -0.5,
        "length": len(text),
        "truncated": False,
    }


def make_run(path: Path, steps=8, completions=True) -> Path:
    """A run directory written by hand: metrics.jsonl, config.yaml, an evaluation, completion files."""
    path.mkdir(parents=True)
    rows = [
        {"step": s, "loss": 1.0 / s, "reward_mean": s / steps, "kl": 0.01 * s, "heldout_accuracy": s / 10,
         "lr": 1e-3, "my_custom": float(s * s), "note": "text is not a curve"}
        for s in range(1, steps + 1)
    ]  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # cut short
    (path / "config.yaml").write_text("recipe: grpo_arithmetic\ndescription: 'a <b>bold</b> & plain'\n")
    ev = path / "eval" / "arithmetic-test-abc123"
    ev.mkdir(parents=True)
    (ev / "eval.json").write_text(json.dumps({"accuracy": 0.625, "pass@4": 0.75, "correct": 5, "total": 8}))
    (path / "eval" / "latest").symlink_to(ev.name)
    if completions:
        (path / "completions").mkdir()
        for step in (1, 3, 5, 8):
            rows = [_completion(step, 0, 1.0), _completion(step, 1, 0.0, "<script>alert('x')</script> & 3")]
            rows.append(_completion(step, 2, None))
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (path / "completions" / f"step_{step:06d}.jsonl").write_text(text)
    return path


def test_a_run_report_is_self_contained_with_curves_evals_completions_and_config(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    main(["report", f"run={run}", "smoothing=0.5"])
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.html'}"
    page = Page((run / "report.html").read_text())
    for img in page.imgs:
        _png(img["src"])
    alts = [img["alt"] for img in page.imgs]
    assert alts[:5] == ["reward_mean", "heldout_accuracy", "kl", "loss", "lr"]  # the headline order
    assert "my_custom" in alts and "note" not in alts  # other numbers in "all metrics"; text is no curve
    assert "details" in page.tags and "All metrics" in page.text and "weight 0.5" in page.text
    assert {"Training curves", "Evaluations", "Completions", "Config"} <= set(page.headings)
    assert ["Step 1", "Step 5", "Step 8"] == [h for h in page.headings if h.startswith("Step")]  # first, middle, last
    assert "arithmetic-test-abc123 (latest)" in page.text and "0.625" in page.text and "pass@4" in page.text
    assert "description: 'a <b>bold</b> & plain'" in page.text  # config.yaml shown as text, not markup
    assert "<script>alert('x')</script> & 3" in page.text and "script" not in page.tags  # escaped
    html = (run / "report.html").read_text()
    assert "&lt;script&gt;" in html and "&amp; 3" in html
    assert not {"script", "link", "iframe", "object"} & set(page.tags)  # nothing runs, nothing is fetched
    right, wrong, missing = page.row_styles[:3]
    assert right != wrong and "#eee" in missing
    assert not list(run.glob(".*tmp*"))  # the temporary file was renamed


def test_a_run_without_completions_gets_a_note_and_output_goes_where_asked(tmp_path):
    run = make_run(tmp_path / "run", completions=False)
    out = write_report("run", str(run), str(tmp_path / "elsewhere" / "r.html"), 0.0)
    page = Page(out.read_text())
    assert "no completions/ directory" in page.text and not page.row_styles
    assert not (run / "report.html").exists()


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    # w = 0.5: m1 = 0.5, m2 = 0.25 + 1 = 1.25, debiased 0.5/0.5 = 1, 1.25/0.75 = 5/3
    assert smooth([1.0, 2.0], 0.5) == pytest.approx([1.0, 5 / 3])
    assert smooth([4.0] * 5, 0.9) == pytest.approx([4.0] * 5)  # a constant stays itself from the first step


def test_headline_keys_come_first_in_their_order_the_rest_sorted():
    rows = [{"step": 1, "zeta": 1, "loss": 1.0, "kl": 0.1, "heldout_b": 1, "heldout_a": 2, "alpha": 3, "flag": True}]
    assert split_keys(rows) == (["heldout_a", "heldout_b", "kl", "loss"], ["alpha", "zeta"])


def test_colours_run_from_red_to_green_over_the_steps_rewards():
    assert reward_colour(0.0, 0.0, 1.0) == "background:hsl(0,70%,88%)"
    assert reward_colour(1.0, 0.0, 1.0) == "background:hsl(120,70%,88%)"
    assert reward_colour(None, 0.0, 1.0) == "background:#eee"


def make_sweep(path: Path) -> Path:
    """A sweep directory as ``grpo sweep`` leaves it: sweep.json, summary.csv, summary.png, run dirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.mkdir(parents=True)
    (path / "sweep.json").write_text(json.dumps({"recipe": "sft_arithmetic", "args": ["trainer.lr=1e-3,3e-3"]}))
    names = ["0-lr=1e-3", "1-lr=3e-3"]
    for name in names:
        make_run(path / name, completions=False)
    (path / "2-failed").mkdir()  # a run that failed before logging a step
    with (path / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "run", "status", "trainer.lr", "loss", "seconds", "error"])
        w.writerows([[0, names[0], "ok", "1e-3", 0.5, 1.0, ""], [1, names[1], "ok", "3e-3", 0.4, 1.0, ""]])
        w.writerow([2, "2-failed", "failed", "1e-2", "", 0.1, "boom <oops>"])
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0.5, 0.4])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    (path / "summary.png").write_bytes(buf.getvalue())
    return path


def test_a_sweep_report_shows_the_summary_and_links_each_runs_report(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep")
    main(["report", f"sweep={sweep}"])
    assert capsys.readouterr().out.strip() == f"report: {sweep / 'report.html'}"
    page = Page((sweep / "report.html").read_text())
    assert page.links == ["0-lr=1e-3/report.html", "1-lr=3e-3/report.html"]
    for link in page.links:
        assert (sweep / link).is_file() and Page((sweep / link).read_text()).imgs
    assert [img["alt"] for img in page.imgs] == ["summary"] and _png(page.imgs[0]["src"])
    assert "boom <oops>" in page.text and "no metrics" in page.text and "3e-3" in page.text
    out = tmp_path / "reports" / "sweep.html"  # elsewhere: the links are relative to it
    main(["report", f"sweep={sweep}", f"output={out}"])
    links = Page(out.read_text()).links
    assert links[0] == "../sweep/0-lr=1e-3/report.html" and (out.parent / links[0]).is_file()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run={missing}"], "error: report.run: no directory '{missing}' (expected a run directory with metrics."),
        (["run={empty}"], "error: report.run: '{empty}' is neither a run (metrics.jsonl) nor a sweep (sweep.json, "),
        (["sweep={run}"], "error: report.sweep: '{run}' is a run directory: pass run={run}"),
        (["run={bad}"], "error: {bad}/metrics.jsonl: no metrics rows with a 'step' (expected one JSON object per "),
        ([], "error: grpo report: pass one of run=DIR (a run directory) or sweep=DIR (a sweep directory)"),
        (["{run}"], "error: '{run}' is not an override (key=value): did you mean run={run} (or sweep={run})?"),
        (["run={run}", "smoothing=1.5"], "error: config key 'report.smoothing'"),
        (["run={run}", "trainer.lr=1"], "error: config key 'trainer.lr' is not used by 'grpo report'"),
    ],
)
def test_mistakes_are_one_line_errors_with_exit_code_2(tmp_path, capsys, args, expected):
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": make_run(tmp_path / "run")}
    paths["empty"].mkdir()
    paths["bad"] = tmp_path / "bad"
    paths["bad"].mkdir()
    (paths["bad"] / "metrics.jsonl").write_text("not json\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["report", *[a.format(**paths) for a in args]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(expected.format(**paths)), err
    assert not (paths["bad"] / "report.html").exists()


def test_print_config_shows_the_report_section(capsys):
    main(["report", "run=somewhere", "output=o.html", "--print-config"])
    out = capsys.readouterr().out
    assert "report:\n  run: somewhere\n  sweep: null\n  output: o.html\n  smoothing: 0.6" in out


def _browser():
    """A headless Chromium: its path, else None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _playwright_errors(url: str):
    """Console errors, page errors and non-inline requests of ``url`` in playwright's Chromium; None when
    playwright or its browser is not installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    problems = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch()
            tab = browser.new_page()
            tab.on("console", lambda m: m.type == "error" and problems.append(m.text))
            tab.on("pageerror", lambda exc: problems.append(str(exc)))
            tab.on("request", lambda r: r.url.startswith(("data:", "file:")) or problems.append(r.url))
            tab.goto(url)
            tab.wait_for_load_state("load")
            problems += [] if tab.locator("h1").count() == 1 else ["no <h1> rendered"]
            browser.close()
    except Exception as e:  # no browser downloaded for playwright: not this test's failure
        if "Executable doesn't exist" in str(e):
            return None
        raise
    return problems


def test_the_report_renders_in_a_headless_browser_without_console_errors(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_report("run", str(run))
    url = out.resolve().as_uri()
    problems = _playwright_errors(url)
    if problems is None:
        chrome = _browser()
        if chrome is None:
            pytest.skip("no headless Chromium (chromium, google-chrome or playwright's) installed")
        done = subprocess.run(
            [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Run report" in done.stdout and "<img" in done.stdout
        problems = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert problems == []


@pytest.mark.slow
def test_a_real_grpo_runs_report_has_its_curves_and_config(sft_run, tmp_path, length_rewards, capsys):
    from grpo_cli.trainer.loop import train

    run = train(
        compose(
            "grpo_arithmetic",
            f"model.name_or_path={sft_run}",
            f"output_dir={tmp_path / 'g'}",
            "reward.name=length_mod_3",
            "trainer.steps=3",
            "source.prompts_per_step=2",
            "source.group_size=4",
        )
    )
    main(["report", f"run={run}"])
    page = Page((run / "report.html").read_text())
    alts = [img["alt"] for img in page.imgs]
    assert {"reward_mean", "kl", "loss"} <= set(alts) and all(_png(img["src"]) for img in page.imgs)
    assert "recipe: grpo_arithmetic" in page.text and "Config" in page.headings
    has_completions = (run / "completions").is_dir()  # another change makes runs write them
    assert ("no completions/ directory" in page.text) != has_completions
    with pytest.raises(UserError):
        write_report("sweep", str(run))
