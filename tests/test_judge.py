import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rose_trl.evaluation.generation import GenerationOptions, format_prompt
from rose_trl.evaluation.judge import (
    EndpointJudge,
    EndpointJudgeConfig,
    HFJudge,
    JudgeEndpointError,
    build_judge_prompt,
    parse_verdict,
    tabulate_verdicts,
    win_rate,
)
from tests.eval_helpers import tiny_causal_lm, tiny_tokenizer


PARSED = {
    "Comparison: A is more detailed.\nThe better response: Response A": "A",
    "Comparison: B is correct.\nThe better response: Response B": "B",
    "Comparison: x\nThe better response: A": "A",
    "Comparison: x\nThe Better Response: response b": "B",
    "**Comparison:** x\n**The better response:** Response B": "B",
    "Comparison: x\nThe better response: **Response A**.": "A",
    "Comparison: x\nThe better response is Response A.": "A",
    'Comparison: x\nThe better response: "Response B"': "B",
    "Comparison: x\nThe better response: [Response A]": "A",
    "Comparison: x\nThe better response:\n\nResponse B": "B",
    "The better response: Response A (it is more complete)": "A",
    # The comparison sentence may name both; only the verdict line counts.
    "Comparison: Response A is vague while Response B is precise.\nThe better response: Response B": "B",
    "Comparison: Response A gives the better response to the user.\nThe better response: Response B": "B",
    "Response A": "A",
    "B": "B",
    "  \n The better response: Response A  \n": "A",
}
UNPARSED = [
    None,
    "",
    "   ",
    "Both responses are equally good.",
    "Comparison: they are similar.\nThe better response: Tie",
    'Comparison: x\nThe better response: <"Response A" or "Response B">',  # the template echoed back
    "Comparison: x\nThe better response: Response A or Response B",
    "Comparison: x\nThe better response: Response C",
    "Comparison: x\nThe better response is a matter of taste",
    "Comparison: x",
    "I cannot decide which is better.",
]


@pytest.mark.parametrize("text,expected", PARSED.items())
def test_parser_accepts_verdicts(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text", UNPARSED)
def test_parser_rejects_non_verdicts(text):
    assert parse_verdict(text) is None


def test_prompt_puts_model_first():
    p = build_judge_prompt("What is 2+2?", "MODEL-ANSWER", "REFERENCE-ANSWER")
    assert p.index("Response A:\nMODEL-ANSWER") < p.index("Response B:\nREFERENCE-ANSWER")
    assert "Comparison:" in p and "The better response:" in p and "Query: What is 2+2?" in p


def test_tabulate_counts_per_subtask_and_overall():
    table = tabulate_verdicts(["A", "B", None, "A", "A", None], ["x", "x", "x", "y", "y", "y"])
    assert [r["subtask"] for r in table] == ["x", "y", "overall"]
    x, y, overall = table
    assert (x["win"], x["lose"], x["unparsed"], x["n"]) == (1, 1, 1, 3)
    assert x["win_rate"] == 0.5 and x["win_rate_all"] == pytest.approx(1 / 3)
    assert (y["win"], y["lose"], y["unparsed"], y["win_rate"]) == (2, 0, 1, 1.0)
    assert (overall["win"], overall["lose"], overall["unparsed"], overall["n"]) == (3, 1, 2, 6)
    assert math.isnan(tabulate_verdicts([None], ["z"])[0]["win_rate"])
    with pytest.raises(ValueError):
        tabulate_verdicts(["A"], ["x", "y"])


# ---------------------------------------------------------------- OpenAI-compatible endpoint judge

KEY = "sk-test-SECRET-123456"


class _Handler(BaseHTTPRequestHandler):
    """Answers like /v1/chat/completions: the verdict is decided by a marker in the model's response."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][0]["content"]
        if self.headers.get("Authorization") != f"Bearer {state['key']}":
            return self._send(
                401, {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}}
            )
        if "FLAKY" in prompt and state["flaky_left"] > 0:
            state["flaky_left"] -= 1
            return self._send(503, {"error": "busy"})
        if "GOOD" in prompt:
            text = "Comparison: A is right.\nThe better response: Response A"
        elif "BAD" in prompt:
            text = "Comparison: B is right.\nThe better response: Response B"
        else:
            text = "I refuse to compare."
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.state = {"requests": [], "key": KEY, "flaky_left": 2}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopper = threading.Timer(60, srv.shutdown)  # bounded even if a test hangs
    stopper.daemon = True
    stopper.start()
    yield srv
    stopper.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _config(server, **kw):
    return EndpointJudgeConfig(
        model="judge-model",
        base_url=f"http://127.0.0.1:{server.server_port}/v1",
        api_key=KEY,
        retry_wait=0.01,
        timeout=5,
        **kw,
    )


def test_endpoint_judge_win_rate(server, caplog):
    caplog.set_level(logging.DEBUG)
    judge = EndpointJudge(_config(server, num_workers=3))
    responses = ["GOOD one", "BAD one", "GOOD FLAKY", "meh", "GOOD", "BAD"]
    result = win_rate(["q"] * 6, responses, ["reference"] * 6, judge, subtasks=["s1", "s1", "s1", "s2", "s2", "s2"])
    s1, s2, overall = result.table
    assert (s1["win"], s1["lose"], s1["unparsed"]) == (2, 1, 0)
    assert (s2["win"], s2["lose"], s2["unparsed"]) == (1, 1, 1)
    assert (overall["win"], overall["lose"], overall["unparsed"], overall["n"]) == (3, 2, 1, 6)
    assert [r["verdict"] for r in result.records] == ["A", "B", "A", None, "A", "B"]
    assert result.records[3]["judge_output"] == "I refuse to compare."
    reqs = server.state["requests"]
    assert len(reqs) == 6 + 2  # two 503s were retried
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "judge-model" for r in reqs)
    assert all(r["body"]["temperature"] == 0.0 for r in reqs)
    assert "| overall | 6 | 3 | 2 | 1 |" in result.to_markdown()
    assert "unparsed" in caplog.text
    assert KEY not in caplog.text


def test_endpoint_gives_up_after_retries_and_counts_unparsed(server, caplog):
    server.state["flaky_left"] = 100
    judge = EndpointJudge(_config(server, max_retries=2))
    assert judge.complete(["FLAKY GOOD"]) == [None]
    assert len(server.state["requests"]) == 3
    assert KEY not in caplog.text


def test_endpoint_auth_error_is_raised_without_the_key(server, caplog):
    caplog.set_level(logging.DEBUG)
    judge = EndpointJudge(_config(server))
    judge.config.api_key = "sk-wrong-KEY-999"
    with pytest.raises(JudgeEndpointError, match="401") as err:
        judge.complete(["GOOD"])
    assert "sk-wrong-KEY-999" not in str(err.value)  # the server echoed it; we redact
    assert "sk-wrong-KEY-999" not in caplog.text
    assert "sk-wrong-KEY-999" not in repr(judge.config)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ROSE_JUDGE_MODEL", "gpt-judge")
    cfg = EndpointJudgeConfig.from_env()
    assert (cfg.model, cfg.base_url, cfg.api_key) == ("gpt-judge", "http://127.0.0.1:9/v1", KEY)
    assert KEY not in repr(cfg)
    monkeypatch.delenv("ROSE_JUDGE_MODEL")
    with pytest.raises(ValueError):
        EndpointJudgeConfig.from_env()


# ---------------------------------------------------------------------------- local HF judge

VERDICT = "Comparison: Response A is right . The better response: Response A"


def _trained_judge():
    """A tiny LM taught (a few dozen steps) to answer every judge prompt with one fixed verdict."""
    tok = tiny_tokenizer(extra_words=VERDICT.split())
    model = tiny_causal_lm(tok, hidden=32, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    prompt = format_prompt(tok, build_judge_prompt("star moon", "light comet", "flour sugar"))
    ids = tok(prompt + " " + VERDICT + " </s>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    model.train()
    for _ in range(80):  # stops as soon as the verdict is memorised (usually ~20 steps)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.05:
            break
        loss.backward()
        opt.step()
    return model.eval(), tok


def test_hf_judge_parses_and_counts():
    model, tok = _trained_judge()
    judge = HFJudge(model, tok, GenerationOptions(max_new_tokens=16, do_sample=False, batch_size=2))
    result = win_rate(
        ["star moon", "star moon", "prime"],
        ["light comet", "light comet", "sum"],
        ["flour sugar"] * 3,
        judge,
        subtasks=["a", "a", "b"],
    )
    outputs = [r["judge_output"] for r in result.records]
    assert all(isinstance(o, str) for o in outputs)
    assert [r["verdict"] for r in result.records] == [parse_verdict(o) for o in outputs]
    # The memorised prompt gets the memorised verdict.
    assert result.records[0]["verdict"] == "A" and result.records[1]["verdict"] == "A"
    overall = result.table[-1]
    assert overall["win"] + overall["lose"] + overall["unparsed"] == overall["n"] == 3
    assert result.table[0]["win"] == 2


def test_hf_judge_unparseable_output_is_counted():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, seed=5)  # untrained: babbles words, never a verdict line
    result = win_rate(
        ["star"] * 2,
        ["moon"] * 2,
        ["sun"] * 2,
        HFJudge(model, tok, GenerationOptions(max_new_tokens=8, do_sample=False)),
    )
    assert result.table[-1]["unparsed"] == sum(parse_verdict(r["judge_output"]) is None for r in result.records)
    assert result.table[-1]["n"] == 2
