"""Publishing: the model card written with every packed folder, and `llmquant push` end to end against a
local HTTP server standing in for the Hub endpoints huggingface_hub calls (the Hub is unreachable here)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny import make_tiny_model

from llmquant.api import QuantConfig, quantize

TOKEN = "hf_" + "s3cr3t" * 6


class FakeHub(BaseHTTPRequestHandler):
    """Repo creation, README validation, preupload (every file 'regular': inlined in the commit) and commit."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.state.setdefault("auth", set()).add(self.headers.get("Authorization"))
        self.state.setdefault("paths", []).append(self.path)
        port = self.server.server_address[1]
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.state["created"] = request
            return self._reply(200, {"url": f"http://127.0.0.1:{port}/{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            if self.state.get("fail_commit"):
                return self._reply(500, {"error": "the server fell over"})
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.state["message"] = lines[0]["value"]["summary"]
            self.state["files"] = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                                   for item in lines if item["key"] == "file"}
            return self._reply(200, {"commitUrl": f"http://127.0.0.1:{port}/me/tiny/commit/abc", "commitOid": "abc"})
        return self._reply(404, {"error": f"no route {self.path}"})


@pytest.fixture
def hub():
    FakeHub.state = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, FakeHub.state
    server.shutdown()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    src = make_tiny_model(root / "hub/models--me--tiny-llama/snapshots/0123abc", "llama")  # as the Hub's cache has it
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a tiny model\n")
    quantize(src, QuantConfig(method="rtn", bits=4, group_size=32), root / "q", progress=False)
    return root / "q"


def push(args, port, **env):
    environment = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN,
                   "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", **env}
    environment.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "llmquant", "push", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=300)


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_every_packed_folder_carries_a_card_the_hub_parses(packed):
    from huggingface_hub import ModelCard

    card = ModelCard.load(packed / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"  # carried from the base model's card
    assert data["base_model"] == "me/tiny-llama"
    assert data["base_model_relation"] == "quantized" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and {"llmquant", "gptq", "4-bit"} <= set(data["tags"])
    assert "| bits | 4 |" in card.text and "| group size | 32 |" in card.text
    assert "## Where it runs" in card.text and "| vLLM (0.34) | yes | Marlin" in card.text
    assert "vllm serve REPO_ID" in card.text and "backend=" not in card.text  # widths of 64 and 96: whole groups
    command = card.text.split("## Reproducing it")[1].split("```bash\n")[1].split("\n")[0]
    assert command.startswith("llmquant quantize ") and "--method rtn --bits 4 --group-size 32 --sym" in command


def test_measurements_recorded_beside_a_checkpoint_reach_its_card(packed, tmp_path):
    """eval --card's record: quality, tasks and speed become card sections; a later record adds to, not
    replaces, what was measured before."""
    import shutil

    from huggingface_hub import ModelCard

    from llmquant.publish import record_path, record_results

    folder = shutil.copytree(packed, tmp_path / "q")
    quality = {"ppl": 12.5, "base_ppl": 12.0, "kld": 0.0421, "top1": 0.9312, "tokens": 3069, "windows": 3,
               "data": "eval.txt", "seqlen": 1024, "base": "me/tiny-llama", "nll": 2.5}
    record_results(folder, quality=quality)
    row = {"prompt_tokens": 256, "new_tokens": 32, "dtype": "bfloat16", "prefill_tokens_per_s": 480.0,
           "decode_tokens_per_s": 27.1, "rss_loaded_bytes": 552 * 2**20}
    speed = {"model": row, "base": [{**row, "decode_tokens_per_s": 18.6, "rss_loaded_bytes": 695 * 2**20}],
             "device": "AMD EPYC, 2 threads"}
    tasks = {"results": {"hellaswag": {"metric": "acc_norm", "value": 0.41, "stderr": 0.01, "base": 0.43,
                                       "retention": 0.41 / 0.43}}, "lm_eval_version": "0.4.13", "limit": None}
    record_results(folder, speed=speed, tasks=tasks)
    card = ModelCard.load(folder / "README.md").text
    assert "| perplexity | 12.0000 | 12.5000 |" in card and "| KL divergence from the base (nats per token) | 0 | 0.04210 |" in card
    assert "| hellaswag | acc_norm | 0.4300 | 0.4100 ± 0.0100 | 0.953 |" in card
    assert "## Speed" in card and "| this model | bfloat16 | 480.0 | 27.10 | 552 |" in card and "AMD EPYC" in card
    assert record_path(folder).name == "llmquant_eval.json" and not list(folder.glob(".*.tmp"))


def test_push_uploads_exactly_the_checkpoint_in_one_commit_and_never_shows_the_token(packed, hub):
    server, state = hub
    before = digest(packed)
    run = push([packed, "me/tiny", "--private"], server.server_address[1])
    assert run.returncode == 0, run.stderr
    assert TOKEN not in run.stdout + run.stderr
    assert state["auth"] == {f"Bearer {TOKEN}"}  # sent to the Hub only
    assert state["created"]["name"] == "tiny" and state["created"]["visibility"] == "private"
    sent = state["files"]
    local = {p.name: p.read_bytes() for p in packed.iterdir() if p.name != "README.md"}
    assert {k: v for k, v in sent.items() if k != "README.md"} == local
    assert b"base_model_relation: quantized" in sent["README.md"] and b'from_pretrained("me/tiny"' in sent["README.md"]
    assert [p for p in state["paths"] if "/commit/" in p] == ["/api/models/me/tiny/commit/main"]
    assert "gptq" in state["message"] and digest(packed) == before


def test_a_failed_push_says_what_to_rerun_and_leaves_the_checkpoint(packed, hub):
    server, state = hub
    state["fail_commit"] = True
    before = digest(packed)
    run = push([packed, "me/tiny"], server.server_address[1])
    line = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"llmquant push {packed} me/tiny" in line and "untouched" in line
    assert TOKEN not in run.stdout + run.stderr and digest(packed) == before


def test_bad_pushes_are_one_line_and_upload_nothing(packed, hub, tmp_path):
    server, state = hub
    port = server.server_address[1]
    unlicensed = tmp_path / "unlicensed"
    quantize(make_tiny_model(tmp_path / "src", "llama"), QuantConfig(method="rtn", bits=4, group_size=32), unlicensed,
             progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    for args, env, fragment in [
        ([packed, "not a repo"], {}, "is not a Hub repo id"),
        ([packed, "tiny"], {}, "is not a Hub repo id"),
        ([packed, "me/tiny"], {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "home")}, "no Hugging Face token"),
        ([unlicensed, "me/tiny"], {}, "pass --license"),
        ([broken, "me/tiny", "--license", "mit"], {}, "broken"),
        ([tmp_path / "missing", "me/tiny"], {}, "no such checkpoint"),
    ]:
        run = push(args, port, **env)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, (args, run.stderr)
        assert fragment in run.stderr, (fragment, run.stderr)
    assert "files" not in state and "created" not in state


def test_dry_run_lists_the_files_and_shows_the_card(packed, hub):
    server, state = hub
    run = push([packed, "me/tiny", "--dry-run"], server.server_address[1])
    assert run.returncode == 0, run.stderr
    listed = {line.split()[2] for line in run.stdout.splitlines() if line.startswith("would upload")}
    assert listed == {p.name for p in packed.iterdir()}
    assert "base_model_relation: quantized" in run.stdout and not state


def test_quantize_can_push_and_checks_where_before_any_work(hub, tmp_path):
    server, state = hub
    port = server.server_address[1]
    src = make_tiny_model(tmp_path / "src", "llama")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    common = [sys.executable, "-m", "llmquant", "quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32"]
    bad = subprocess.run([*common, "--out", str(tmp_path / "bad"), "--push-to-hub", "not a repo"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "is not a Hub repo id" in bad.stderr and not (tmp_path / "bad").exists()
    run = subprocess.run([*common, "--out", str(tmp_path / "q"), "--push-to-hub", "me/tiny", "--license", "mit",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["quantized_linears"] == 14  # stdout is still one JSON object
    local = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir() if p.name != "README.md"}
    assert {k: v for k, v in state["files"].items() if k != "README.md"} == local
    assert b"license: mit" in state["files"]["README.md"] and TOKEN not in run.stdout + run.stderr


def test_a_folder_of_gguf_files_goes_up_as_one_repo(hub, tmp_path):
    server, state = hub
    src = make_tiny_model(tmp_path / "src", "llama", hidden=256, intermediate=512)
    folder = tmp_path / "ggufs"
    folder.mkdir()
    for mix in ("Q8_0", "Q4_K_M"):
        quantize(src, QuantConfig(method="rtn", format="gguf", gguf_type=mix), folder / f"tiny-{mix}.gguf", progress=False)
    run = push([folder, "me/tiny-gguf", "--license", "mit", "--base-model", "me/tiny"], server.server_address[1])
    assert run.returncode == 0, run.stderr
    assert set(state["files"]) == {"tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "README.md"}
    assert state["files"]["tiny-Q4_K_M.gguf"] == (folder / "tiny-Q4_K_M.gguf").read_bytes()
    card = state["files"]["README.md"].decode()
    assert "library_name: gguf" in card and "Q4_K_M, Q8_0" in card and "base_model: me/tiny" in card
    assert "- Q8_0" in card and "- Q4_K_M" in card


def test_the_cards_llmquant_snippet_runs(packed):
    """The card's llmquant loading snippet, executed with the local folder for the repo id, loads the model."""
    import re

    text = (packed / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    assert "llmquant.load_any" in snippet
    scope = {}
    exec(snippet.replace('"REPO_ID"', repr(str(packed))), scope)
    assert type(scope["model"]).__name__ == "LlamaForCausalLM" and scope["tokenizer"] is not None
