"""saeworks.hub.load_sae: local directories and hub repos (served from an offline HF cache laid out
as snapshot_download leaves it), both SAE layouts, revisions, and one-line errors for every miss.
Nothing here reaches the network: HF_HUB_OFFLINE is on in every test."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from saeworks.hub import SAELoadError, load_sae, sae_directory
from saeworks.sae.config import SAEConfig
from saeworks.sae.errors import SaeworksError
from saeworks.sae.importers import import_sparsify
from saeworks.sae.io import SAEFormatError, save_sae
from saeworks.sae.registry import create_sae
from saeworks.sae.topk import TopKSAE
from tests.helpers import REPO

D_IN, D_SAE, K = 8, 32, 4
HOOK = "blocks.3.hook_resid_post"
OTHER_HOOK = "blocks.5.hook_resid_post"

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_sae(directory: Path, architecture: str = "topk", seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a small SAE with non-trivial weights to `directory`; returns the tensors of its file."""
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_sae(sae, directory)
    return load_file(str(directory / "sae_weights.safetensors"))


def sparsify_sae(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A folder as sparsify's SparseCoder.save_to_disk writes it (cfg.json + sae.safetensors)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
               "encoder.bias": torch.randn(D_SAE, generator=g),
               "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    directory.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 4, "num_latents": 0, "k": K, "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": D_IN}
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae.safetensors"))
    return tensors


def files_of(directory: Path, prefix: str = "") -> dict[str, Path]:
    """{repo path: local file} for the files of `directory`, put under `prefix` in the repo."""
    return {f"{prefix}/{p.name}" if prefix else p.name: p for p in sorted(directory.iterdir())}


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], revision: str = "main") -> Path:
    """Lay `files` out in `cache` exactly as snapshot_download leaves a model repo: each file a blob
    named by its hash under blobs/, linked (relative symlink) from snapshots/<commit>/<repo path>,
    and refs/<revision> holding the commit hash. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}:{sorted(files)}".encode()).hexdigest()  # 40 hex digits
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # huggingface_hub writes it without a newline
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into
    its constants at import, so the constants are patched along with the environment (the
    subprocess test below checks the environment alone)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def assert_weights(sae: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = sae.inference_tensors()  # type: ignore[operator]
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_saelens_style_repo_folder_loads_from_the_cache(tmp_path: Path, hf_cache: Path) -> None:
    expected = saved_sae(tmp_path / "a")
    saved_sae(tmp_path / "b", seed=1)
    snapshot = cache_repo(hf_cache, "owner/name",
                          {**files_of(tmp_path / "a", HOOK), **files_of(tmp_path / "b", OTHER_HOOK)})
    assert sae_directory("owner/name", HOOK) == snapshot / HOOK  # the files stay in the HF cache
    sae = load_sae("owner/name", sae_id=HOOK)
    assert isinstance(sae, TopKSAE) and not sae.training and sae.cfg.k == K
    assert_weights(sae, expected)
    assert_weights(load_sae("owner/name", f"{HOOK}/"), expected)  # a trailing slash is ignored


def test_a_sparsify_repo_folder_loads_as_its_importer_reads_it(tmp_path: Path, hf_cache: Path) -> None:
    tensors = sparsify_sae(tmp_path / "layers.3")
    sparsify_sae(tmp_path / "layers.4", seed=1)
    cache_repo(hf_cache, "EleutherAI/sae-tiny-4x", {**files_of(tmp_path / "layers.3", "layers.3"),
                                                    **files_of(tmp_path / "layers.4", "layers.4")})
    sae = load_sae("EleutherAI/sae-tiny-4x", "layers.3")
    assert isinstance(sae, TopKSAE) and sae.d_sae == D_SAE and sae.cfg.k == K
    assert_weights(sae, {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
                         "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]})
    assert_weights(sae, import_sparsify(tmp_path / "layers.3").inference_tensors())


def test_an_sae_at_the_repo_root_and_a_revision(tmp_path: Path, hf_cache: Path) -> None:
    main = saved_sae(tmp_path / "main", architecture="relu")
    tagged = saved_sae(tmp_path / "tagged", architecture="jumprelu", seed=2)
    cache_repo(hf_cache, "owner/root-sae", files_of(tmp_path / "main"))
    snapshot = cache_repo(hf_cache, "owner/root-sae", files_of(tmp_path / "tagged"), revision="v1")
    assert_weights(load_sae("owner/root-sae"), main)
    assert_weights(load_sae("owner/root-sae", revision="v1"), tagged)
    assert_weights(load_sae("owner/root-sae", revision=snapshot.name), tagged)  # a commit hash


def test_cache_dir_is_passed_through(tmp_path: Path, hf_cache: Path) -> None:
    expected = saved_sae(tmp_path / "a")
    cache_repo(tmp_path / "elsewhere", "owner/name", files_of(tmp_path / "a", HOOK))
    assert_weights(load_sae("owner/name", HOOK, cache_dir=tmp_path / "elsewhere"), expected)
    with pytest.raises(SAELoadError, match="not in the Hugging Face cache"):
        load_sae("owner/name", HOOK)  # not in the default cache


def one_line_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(SAELoadError) as info:
        load_sae(*args, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, SAEFormatError) and isinstance(info.value, SaeworksError)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_sae_id_names_the_folders_that_hold_an_sae(tmp_path: Path, hf_cache: Path) -> None:
    saved_sae(tmp_path / "a")
    sparsify_sae(tmp_path / "layers.7")
    (tmp_path / "README.md").write_text("# SAEs")
    cache_repo(hf_cache, "owner/name", {**files_of(tmp_path / "a", HOOK), **files_of(tmp_path / "layers.7",
                                                                                       "deep/layers.7"),
                                        "README.md": tmp_path / "README.md"})
    message = one_line_error("owner/name", sae_id="blocks.8.hook_resid_pre")
    assert message == ("the hub repo 'owner/name' has no SAE folder 'blocks.8.hook_resid_pre'; pass sae_id= "
                       f"one of the folders that hold an SAE: {HOOK}, deep/layers.7")
    message = one_line_error("owner/name")  # nothing at the root
    assert message.startswith("the hub repo 'owner/name' holds no SAE (no cfg.json with ")
    assert message.endswith(f"one of the folders that hold an SAE: {HOOK}, deep/layers.7")


def test_a_repo_absent_from_the_offline_cache(hf_cache: Path) -> None:
    message = one_line_error("owner/absent", sae_id=HOOK)
    assert message == (f"the hub repo 'owner/absent' is not in the Hugging Face cache at {hf_cache} and "
                       "HF_HUB_OFFLINE=1 forbids downloading it: set HF_HUB_OFFLINE=0 to fetch it, or pass a "
                       "local SAE directory (there is no directory 'owner/absent')")
    assert "at revision 'v2'" in one_line_error("owner/absent", revision="v2")


def test_local_directories(tmp_path: Path, hf_cache: Path) -> None:
    expected = saved_sae(tmp_path / "release" / HOOK)
    tensors = sparsify_sae(tmp_path / "release" / "layers.3")
    assert_weights(load_sae(tmp_path / "release" / HOOK), expected)
    assert_weights(load_sae(str(tmp_path / "release"), HOOK), expected)
    assert torch.equal(load_sae(tmp_path / "release", "layers.3").W_dec, tensors["W_dec"])
    message = one_line_error(tmp_path / "release")
    assert message.endswith(f"holds no SAE (no cfg.json with sae_weights.safetensors or sae.safetensors); "
                            f"pass sae_id= one of the folders that hold an SAE: {HOOK}, layers.3")
    assert one_line_error(tmp_path / "release", "layers.9").endswith(
        f"has no SAE folder 'layers.9'; pass sae_id= one of the folders that hold an SAE: {HOOK}, layers.3")
    (tmp_path / "release" / "layers.3" / "sae.safetensors").unlink()
    assert "holds no SAE in 'layers.3'" in one_line_error(tmp_path / "release", "layers.3")


def test_local_path_errors(tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved_sae(tmp_path / "sae")
    assert one_line_error(tmp_path / "sae" / "cfg.json").endswith(
        "is a file; pass the SAE's directory (cfg.json and its weights)")
    assert "applies to hub repos" in one_line_error(tmp_path / "sae", revision="v1")
    for climbing in ("../sae", "/sae", "a/../../sae"):
        assert "no leading '/', no '..'" in one_line_error(tmp_path, climbing)
    for neither in (tmp_path / "missing", "missing", "./owner/name", "a/b/c", "owner/"):
        assert "is neither an existing local path nor a Hugging Face repo id" in one_line_error(neither)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    saved_sae(tmp_path / "owner" / "name")
    assert load_sae("owner/name").d_sae == D_SAE  # an existing local path wins over a repo id


LOAD_IN_A_FRESH_PROCESS = """
import sys
from saeworks.hub import SAELoadError, load_sae
print(load_sae("owner/name", sys.argv[1]).W_dec.sum().item())
try:
    load_sae("owner/absent")
except SAELoadError as err:
    print(err)
"""


def test_hf_home_and_hf_hub_offline_are_read_from_the_environment(tmp_path: Path) -> None:
    expected = saved_sae(tmp_path / "a")
    cache_repo(tmp_path / "hf-home" / "hub", "owner/name", files_of(tmp_path / "a", HOOK))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, HOOK], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    total, error = out.stdout.splitlines()
    assert float(total) == pytest.approx(expected["W_dec"].sum().item(), rel=1e-6)
    assert f"not in the Hugging Face cache at {tmp_path / 'hf-home' / 'hub'} and HF_HUB_OFFLINE=1" in error
