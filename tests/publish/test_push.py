"""The model card and `mmcl push`, offline: the Hub is an `httpx2.MockTransport` that records every
request, so the test sees exactly which files a push sends and where the token goes."""

from __future__ import annotations

import base64
import json
import re
import math
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import _http

from mmcl.data import emoji as emoji_data
from mmcl.secrets import scrub_secrets
from mmcl.publish.card import write_model_card
from mmcl.cli import main
from mmcl.config import Config
from mmcl.publish.push import push_folder, select_files

FAKE_TOKEN = "hf_mmclFAKEtokenDoNotLeak0123456789"
ENDPOINT = "https://hub.invalid"  # a reserved name: nothing could answer even if the mock were bypassed
METRICS = {"val/image_to_text_R@1": 0.25, "val/image_to_text_R@5": 0.5, "val/text_to_image_R@1": 0.125,
           "val/text_to_image_median_rank": 3.0, "zs_emoji/top1": 0.375, "zs_emoji/top5": 0.75,
           "zs_emoji/mean_per_class_recall": 0.3}
NOT_RESULTS = {"val/images": 64.0, "val/texts": 120.0, "train/steps": 6.0, "train/wall_s": 1.5}
SECRETS = ("hunter2-password", "sk-api-key-value", "aws-secret-value", FAKE_TOKEN)

# What an exported folder holds (transformers + sentence-transformers) ...
ALLOWED = ["model.safetensors", "config.json", "mmcl_config.json", "mmcl_training_config.yaml",
           "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
           "preprocessor_config.json", "modules.json", "config_sentence_transformers.json",
           "sentence_bert_config.json", "1_Pooling/config.json", "2_Dense/config.json",
           "2_Dense/model.safetensors", "README.md"]
# ... and what a training run leaves around it, some of it holding the token.
FORBIDDEN = ["optimizer.bin", "random_states_0.pkl", "pytorch_model.bin", "scheduler.pt", "metrics.json",
             "mmcl_train_state.json", "logs/metrics.jsonl", "logs/events.out.tfevents.1.host", ".env",
             "checkpoints/step-00000006/model.safetensors", "checkpoints/step-00000006/optimizer.bin",
             "1_Pooling/extra.pkl", "2_Dense/pytorch_model.bin", "notes.txt", "secrets.json"]


def training_config() -> dict:
    config = Config().to_dict()
    config["data"]["validation"] = "builtin:emoji"  # as the quickstart: its own held-out emoji
    config["model"].update(text_model="sentence-transformers/all-MiniLM-L6-v2", text_pooling="mean",
                           vision_model="/home/someone/private/vit-tiny", vision_pooling="cls", projection_dim=16)
    config["eval"]["sets"] = {"zs_emoji": {"task": "zero_shot", "dataset": "builtin:emoji",
                                           "split": "validation", "templates": "simple"}}
    # what must never reach a card: a config someone extended with credentials
    config["hub"]["token"] = FAKE_TOKEN
    config["data"]["storage"] = {"endpoint": "s3://bucket", "aws_secret_access_key": "aws-secret-value",
                                 "accounts": [{"user": "me", "password": "hunter2-password"}]}
    config["OPENAI_API_KEY"] = "sk-api-key-value"
    return config


def make_model_folder(folder: Path) -> Path:
    """A folder shaped like an exported model (tiny placeholder files), plus forbidden neighbours."""
    from safetensors.numpy import save_file
    import numpy as np

    folder.mkdir(parents=True)
    save_file({"logit_scale": np.array(math.log(1 / 0.05), dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "mmcl_config.json").write_text(json.dumps({
        "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2},
        "vision_config": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2},
        "text_pooling": "mean", "vision_pooling": "cls", "projection_dim": 16}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    clean = {k: v for k, v in training_config().items() if k != "OPENAI_API_KEY"}
    clean["hub"].pop("token")
    clean["data"].pop("storage")
    with open(folder / "mmcl_training_config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(clean, f)
    for name in ALLOWED + FORBIDDEN:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() and name != "README.md":
            path.write_text(f"HF_TOKEN={FAKE_TOKEN}\n" if name in FORBIDDEN else f"{{\"file\": \"{name}\"}}\n")
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(folder / "2_Dense/model.safetensors"))
    return folder


def test_scrub_secrets_drops_credential_keys_recursively():
    config = training_config()
    clean = scrub_secrets(config)
    text = json.dumps(clean)
    assert not any(secret in text for secret in SECRETS)
    assert "token" not in clean["hub"] and "OPENAI_API_KEY" not in clean
    assert clean["data"]["storage"] == {"endpoint": "s3://bucket", "accounts": [{"user": "me"}]}
    assert clean["model"] == config["model"]  # nothing else is touched
    assert scrub_secrets({"note": f"use {FAKE_TOKEN}"}) == {"note": "use <redacted>"}
    assert scrub_secrets({"tokenizer": "t", "HF_TOKEN": "x", "apiKey": "y"}) == {"tokenizer": "t"}


def test_model_card_metadata_results_usage_and_no_secrets(tmp_path):
    folder = make_model_folder(tmp_path / "run" / "final")
    note = "text pooling 'mean' cannot be expressed natively in transformers; use the sentence-transformers route"
    path = write_model_card(folder, training_config(), {**METRICS, **NOT_RESULTS}, export_notes=[note])
    text = path.read_text(encoding="utf-8")

    meta = metadata_load(path)
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["library_name"] == "sentence-transformers"
    assert {"mmcl", "clip", "zero-shot-image-classification", "sentence-transformers", "transformers"} <= set(meta["tags"])
    assert meta["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"]  # local towers stay out
    assert meta["license"] == "cc-by-sa-4.0"  # the OpenMoji emoji were used
    assert "datasets" not in meta  # builtin:emoji is no Hub dataset
    # model-index: valid for huggingface_hub, one entry per evaluation and task, values = the metrics
    card = ModelCard.load(path)
    data = ModelCardData(**meta)
    assert data.model_name == "run" and len(data.eval_results) == len(METRICS)
    index = meta["model-index"][0]["results"]
    assert sorted(r["task"]["type"] for r in index) == ["image-text-retrieval",  # not captioning
                                                        "zero-shot-image-classification"]
    reported = {m["name"]: m["value"] for r in index for m in r["metrics"]}
    assert reported == METRICS
    assert card.data.eval_results[0].dataset_split == "validation"
    # the text: towers, usage for both libraries, the notes, the attribution
    for needle in ("`bert`", "pooling `mean`", "Temperature: 0.0500", "AutoModel.from_pretrained",
                   "get_text_features", "get_image_features", "softmax",
                   "SentenceTransformer(", ".encode(", note, emoji_data.ATTRIBUTION, "## Limitations",
                   "| `train.learning_rate` |", "| zs_emoji | Zero-shot image classification |"):
        assert needle in text, needle
    assert "local `vit-tiny`" in text and "/home/someone" not in text
    assert not any(secret in text for secret in SECRETS)
    assert "aws_secret_access_key" not in text and "OPENAI_API_KEY" not in text


def test_the_card_of_a_csv_trained_run_is_true(tmp_path):
    """Trained on the user's CSV, evaluated on the built-in emoji: no emoji licence, the emoji listed as an
    evaluation only, and the hub.* keys in the YAML as given (read back with huggingface_hub)."""
    folder = make_model_folder(tmp_path / "run" / "final")
    config = Config().to_dict()
    config["data"].update(train="/home/someone/pairs.csv", validation=None)
    config["eval"]["sets"] = {"zs_emoji": {"task": "zero_shot", "dataset": "builtin:emoji", "split": "validation"}}
    path = write_model_card(folder, config, {"zs_emoji/top1": 0.25})
    meta, text = metadata_load(path), path.read_text(encoding="utf-8")
    assert "license" not in meta and "datasets" not in meta and "language" not in meta
    assert "Evaluated (not trained) on mmcl's built-in OpenMoji set" in text and "Trained on mmcl" not in text
    assert "demonstration, not a photo model" not in text and "/home/someone" not in text
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "openmoji"  # an evaluation result
    held = metadata_load(write_model_card(folder, config, {"val/image_to_text_R@1": 0.5}))  # no validation named
    dataset = held["model-index"][0]["results"][0]["dataset"]
    assert dataset["type"] == "pairs.csv" and dataset["name"] == "pairs.csv: a held-out 0.05 of its images (not trained on)"

    config["hub"].update(license="apache-2.0", datasets=["me/my-captions"], language=["en", "de"],
                         base_model=["openai/clip-vit-base-patch32"])
    meta = metadata_load(write_model_card(folder, config, {"zs_emoji/top1": 0.25}))
    assert (meta["license"], meta["datasets"], meta["language"], meta["base_model"]) == (
        "apache-2.0", ["me/my-captions"], ["en", "de"], ["openai/clip-vit-base-patch32"])

    config["data"]["train"] = "builtin:emoji"  # trained on the emoji: their licence applies
    config["hub"]["license"] = None
    meta = metadata_load(write_model_card(folder, config, None))
    assert meta["license"] == "cc-by-sa-4.0"


def test_select_files_is_the_allow_list(tmp_path):
    folder = make_model_folder(tmp_path / "export")
    (folder / "README.md").write_text("# card\n")
    assert set(select_files(folder)) == set(ALLOWED)


def test_select_files_follows_a_router_into_its_sub_modules(tmp_path):
    """mmcl's sentence-transformers export: a root Router whose towers sit in folders that only
    router_config.json names (modules.json lists the Router as path "")."""
    folder = tmp_path / "st"
    sub = ["text_0_Transformer", "text_1_Pooling", "image_0_Transformer", "image_1_Dense"]
    uploaded = ["modules.json", "router_config.json", "config_sentence_transformers.json", "1_Normalize/config.json",
                "text_0_Transformer/model.safetensors", "text_0_Transformer/tokenizer.json",
                "text_0_Transformer/sentence_bert_config.json", "text_1_Pooling/config.json",
                "image_0_Transformer/model.safetensors", "image_0_Transformer/preprocessor_config.json",
                "image_1_Dense/config.json", "image_1_Dense/model.safetensors"]
    kept_back = ["mmcl_export.json", "text_0_Transformer/optimizer.bin", "image_1_Dense/notes.txt",
                 "unlisted_0_Transformer/model.safetensors", "../outside.json"]
    for name in uploaded + kept_back:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Router"},
                                                     {"idx": 1, "name": "1", "path": "1_Normalize", "type": "Normalize"}]))
    (folder / "router_config.json").write_text(json.dumps({"types": {**{s: "M" for s in sub}, "../": "M"},
                                                           "structure": {"text": sub[:2], "image": sub[2:]}}))
    assert set(select_files(folder)) == set(uploaded)


class FakeHub:
    """Answers the Hub endpoints a push uses and records every request."""

    def __init__(self, repo_is_private: bool = True) -> None:
        self.requests: list[dict] = []
        self.unexpected: list[str] = []
        self.repo_is_private = repo_is_private

    def __call__(self, request):  # httpx2.Request -> httpx2.Response
        import httpx2

        body = request.read()
        self.requests.append({"method": request.method, "path": request.url.path, "url": str(request.url),
                              "headers": dict(request.headers), "body": body})
        path, method = request.url.path, request.method
        parts = path.split("/")
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            return httpx2.Response(200, json={"url": f"{ENDPOINT}/{payload['organization']}/{payload['name']}"})
        if method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if method == "GET" and path.startswith("/api/models/") and len(parts) == 5:
            return httpx2.Response(200, json={"id": "/".join(parts[3:5]), "private": self.repo_is_private,
                                              "sha": "0" * 40})
        if method == "POST" and "/branch/" in path:
            return httpx2.Response(200, json={})
        if method == "POST" and "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if method == "GET" and path == "/api/agent-harnesses":
            # huggingface_hub's user-agent fetches this list once a day, without credentials
            return httpx2.Response(404, json={"error": "not mocked"})
        if method == "POST" and "/commit/" in path:
            repo = "/".join(parts[3:5])
            return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo}/commit/{'a' * 40}",
                                              "commitOid": "a" * 40})
        self.unexpected.append(f"{method} {path}")
        return httpx2.Response(404, json={"error": "not mocked"})

    def commits(self) -> list[list[dict]]:
        """Each commit's NDJSON lines."""
        return [[json.loads(line) for line in r["body"].splitlines() if line]
                for r in self.requests if "/commit/" in r["path"]]


@pytest.fixture
def fake_hub(monkeypatch):
    """Route huggingface_hub's HTTP client to a `FakeHub`; the token comes from HF_TOKEN."""
    import httpx2

    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    # conftest sets HF_HUB_OFFLINE=1, read once into this constant; the request hook checks it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", ENDPOINT)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(lambda request: hub(request)),
        event_hooks={"request": [_http.hf_request_event_hook]}))  # the real hook, as in production
    yield hub
    huggingface_hub.set_client_factory(_http.default_client_factory)


def _run_push(argv: list[str]) -> int:
    return main(argv)


def test_push_sends_only_allow_listed_files_and_never_the_token(tmp_path, fake_hub, capsys, caplog):
    folder = make_model_folder(tmp_path / "run" / "final")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({**METRICS, **NOT_RESULTS}))
    assert not (folder / "README.md").exists()

    assert _run_push([  "push", str(folder), "--repo-id", "someone/emoji-clip", "--private",
                      "--revision", "exp-1", "--commit-message", "first emoji model"]) == 0

    assert fake_hub.unexpected == []
    # the card was written from ../metrics.json and the saved training config
    assert {m["name"]: m["value"] for r in metadata_load(folder / "README.md")["model-index"][0]["results"]
            for m in r["metrics"]} == METRICS
    # private, revision and commit message reach the Hub
    create = next(r for r in fake_hub.requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"]) == {"name": "emoji-clip", "organization": "someone", "visibility": "private"}
    assert any(r["path"] == "/api/models/someone/emoji-clip/branch/exp-1" for r in fake_hub.requests)
    assert any(r["path"] == "/api/models/someone/emoji-clip/preupload/exp-1" for r in fake_hub.requests)
    (commit,) = fake_hub.commits()
    assert next(r for r in fake_hub.requests if "/commit/" in r["path"])["path"].endswith("/commit/exp-1")
    assert commit[0] == {"key": "header", "value": {"summary": "first emoji model", "description": ""}}
    # exactly the allow-listed files, with their bytes
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in commit[1:] if line["key"] == "file"}
    assert [line["key"] for line in commit[1:]] == ["file"] * len(commit[1:])
    assert set(sent) == set(ALLOWED)
    assert all(sent[name] == (folder / name).read_bytes() for name in sent)
    # the token: in the Authorization header of requests, nowhere else
    token = FAKE_TOKEN.encode()
    api_calls = [r for r in fake_hub.requests if r["path"] != "/api/agent-harnesses"]
    assert len(api_calls) == 6  # create, repo info, branch, validate-yaml, preupload, commit
    assert all(r["headers"]["authorization"] == f"Bearer {FAKE_TOKEN}" for r in api_calls)
    for r in fake_hub.requests:
        assert token not in r["body"] and token not in r["url"].encode()
        assert not any(FAKE_TOKEN in v for k, v in r["headers"].items() if k != "authorization")
    assert not any(token in content for content in sent.values())
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err + caplog.text
    assert "pushed to someone/emoji-clip" in out.out and "commit/" in out.out


def test_push_defaults_public_main_and_refuses_to_leak(tmp_path, fake_hub):
    folder = make_model_folder(tmp_path / "export")
    write_model_card(folder, None, None)
    url = push_folder(folder, "someone/emoji-clip")
    assert url == f"{ENDPOINT}/someone/emoji-clip/commit/{'a' * 40}"
    create = next(r for r in fake_hub.requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"])["visibility"] == "public"
    assert not any("/branch/" in r["path"] for r in fake_hub.requests)
    assert [r["path"] for r in fake_hub.requests if "/commit/" in r["path"]] == \
        ["/api/models/someone/emoji-clip/commit/main"]
    assert ModelCard.load(folder / "README.md").data.pipeline_tag == "zero-shot-image-classification"

    # an allow-listed file holding the token stops the push before any file is sent
    fake_hub.requests.clear()
    (folder / "tokenizer_config.json").write_text(json.dumps({"hub_token": FAKE_TOKEN}))
    with pytest.raises(ValueError, match="contains a Hugging Face token") as err:
        push_folder(folder, "someone/emoji-clip")
    assert FAKE_TOKEN not in str(err.value) and fake_hub.requests == []


def test_push_private_to_an_existing_public_repo_is_refused(tmp_path, fake_hub):
    folder = make_model_folder(tmp_path / "export")
    fake_hub.repo_is_private = False
    with pytest.raises(ValueError, match="is public"):
        push_folder(folder, "someone/emoji-clip", private=True)
    assert fake_hub.commits() == []


def test_training_config_with_secret_keys_is_not_uploaded(tmp_path, fake_hub, caplog):
    folder = make_model_folder(tmp_path / "export")
    with open(folder / "mmcl_training_config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump({"train": {"max_steps": 1}, "logging": {"wandb_api_key": "sk-api-key-value"}}, f)
    push_folder(folder, "someone/emoji-clip")
    (commit,) = fake_hub.commits()
    sent = {line["value"]["path"] for line in commit[1:]}
    assert sent == set(ALLOWED) - {"mmcl_training_config.yaml", "README.md"}
    assert "logging.wandb_api_key" in caplog.text and "sk-api-key-value" not in caplog.text


def test_push_sends_only_regular_files_inside_the_folder(tmp_path, fake_hub, capsys):
    """Links are never followed, whatever their name: vocab.txt -> a system file, a weights file
    pointing outside, a module folder that is a link."""
    folder = make_model_folder(tmp_path / "export")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("root:secret-hash")
    (outside / "config.json").write_text("{}")
    (folder / "vocab.txt").unlink()
    (folder / "vocab.txt").symlink_to("/etc/passwd")
    (folder / "evil.safetensors").symlink_to(outside / "shadow")
    (folder / "3_Extra").symlink_to(outside, target_is_directory=True)
    modules = json.loads((folder / "modules.json").read_text()) + [{"idx": 3, "name": "3", "path": "3_Extra"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    chosen = select_files(folder)
    assert "vocab.txt" not in chosen and "evil.safetensors" not in chosen and not any("3_Extra" in f for f in chosen)
    assert main(["push", str(folder), "--repo-id", "someone/x", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "vocab.txt (a link)" in said and "evil.safetensors (a link)" in said and "3_Extra (a link to a folder)" in said
    assert fake_hub.requests == []  # a dry run sends nothing
    push_folder(folder, "someone/x")
    (commit,) = fake_hub.commits()
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in commit[1:]}
    assert set(sent) == set(ALLOWED) - {"vocab.txt", "README.md"}
    assert not any(b"root:" in content or b"secret-hash" in content for content in sent.values())


def test_a_broken_safetensors_file_or_a_token_shaped_string_stops_the_push(tmp_path, fake_hub):
    folder = make_model_folder(tmp_path / "export")
    good = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(good[:-2])  # its tensor runs past the end
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file"):
        push_folder(folder, "someone/x")
    (folder / "model.safetensors").write_bytes(good)
    other = "hf_" + "Z" * 30  # not the pushing token: any token-shaped string
    (folder / "special_tokens_map.json").write_text(json.dumps({"note": other}))
    with pytest.raises(ValueError, match=r"special_tokens_map.json contains a Hugging Face token"):
        push_folder(folder, "someone/x")
    assert fake_hub.requests == []


def test_a_push_without_network_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    folder = make_model_folder(tmp_path / "export")
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "mmcl.cli", "push", str(folder), "--repo-id", "someone/x"],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith("mmcl push: error: could not push") and FAKE_TOKEN not in done.stderr + done.stdout


def test_the_token_scan_reads_in_chunks_and_finds_a_token_across_a_boundary(tmp_path):
    from mmcl.publish.push import _holds

    token = "hf_" + "Q" * 30
    path = tmp_path / "weights.bin"
    for offset in range(0, 40, 7):  # the token starting anywhere relative to the 16-byte chunks
        path.write_bytes(b"\0" * offset + token.encode() + b"\0" * 5)
        assert _holds(path, re.compile(rb"hf_[A-Za-z0-9]{20,}"), chunk=16)
    path.write_bytes(b"hf_" + b"\0" * 40 + b"Q" * 30)
    assert not _holds(path, re.compile(rb"hf_[A-Za-z0-9]{20,}"), chunk=16)
