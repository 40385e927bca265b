"""REC evaluation (VLM-R1's r1 and baseline protocols): box extraction, rescale and the strict IoU > 0.5 rule
against hand-computed cases, VLM-R1's JSON eval lists and seeded subset; `vlmr1 eval rec` and `vlmr1 infer` give the
same greedy completions on the JAX and torch backends."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.cli import run_cli
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.data.synthetic import generate, image_folder
from vlmr1_jax.eval.data import eval_subset, load_eval_samples
from vlmr1_jax.eval.protocols import BASELINE, extract_box, extract_box_baseline, get_protocol
from vlmr1_jax.eval.rec import image_frames, rescale_box, score_rec
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.qwen2_5_vl.config import get_preset

PROMPT = "find the red box"


@pytest.mark.parametrize(
    "completion, box",
    [
        ('<think>x</think><answer>{"bbox_2d": [10, 20, 30, 40]}</answer>', [10, 20, 30, 40]),
        ("<answer>[10, 20, 30, 40]</answer>", [0, 0, 0, 0]),  # the JSON braces are required
        ('<answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer>', [0, 0, 0, 0]),  # integers only
        ('<answer>{"bbox_2d": [-1, 2, 3, 4]}</answer>', [0, 0, 0, 0]),
        ("<answer>{[1,2,3,4]}</answer> <answer>{[5, 6, 7, 8]}</answer>", [1, 2, 3, 4]),  # first answer only
        ('<answer>{"a": [1, 2, 3, 4], "b": [5,6,7,8]}</answer>', [5, 6, 7, 8]),  # greedy `.*`: the last box
        ('{"bbox_2d": [10, 20, 30, 40]}', [0, 0, 0, 0]),  # no answer tags
        ("<answer>{[1, 2, 3, 4]}", [0, 0, 0, 0]),  # unclosed
    ],
)
def test_extract_box(completion, box):
    assert extract_box(completion) == box


@pytest.mark.parametrize(
    "completion, box",
    [
        ('{"bbox_2d": [10.5, -2, 30, 40]}', [10.5, -2.0, 30.0, 40.0]),  # floats and negatives, no tags needed
        ("<answer>[10, 20, 30, 40]</answer>", [10, 20, 30, 40]),  # no braces needed
        ("first [1, 2, 3, 4] then [5, 6, 7, 8]", [1, 2, 3, 4]),  # the first box anywhere
        ("[ 1 , 2 , 3 , 4 ]", [1, 2, 3, 4]),  # spaces inside the brackets
        ("[.5, 0.25, 2, 3]", [0.5, 0.25, 2, 3]),  # a leading dot is a number
        ("[1., 2, 3, 4]", [0, 0, 0, 0]),  # a trailing dot is not
        ("[1, 2, 3]", [0, 0, 0, 0]),
        ("(1, 2, 3, 4)", [0, 0, 0, 0]),
        ("[1, 2, 3, 4, 5]", [0, 0, 0, 0]),  # four numbers then ']'
    ],
)
def test_extract_box_baseline(completion, box):
    assert extract_box_baseline(completion) == box


def test_protocols_by_name_or_path():
    assert get_protocol("baseline") is BASELINE and BASELINE.max_new_tokens == 256
    assert BASELINE.task_type == "{Question} Please provide the bounding box coordinate in JSON format."
    assert get_protocol("vlmr1_jax.eval.protocols:BASELINE") is BASELINE  # a family's own protocol, by path
    bad_names = [
        ("nope", "unknown"),
        ("vlmr1_jax.eval.protocols:NOPE", "cannot import"),
        ("vlmr1_jax.eval.protocols:NO_BOX", "not a RecProtocol"),
    ]
    for bad, message in bad_names:
        with pytest.raises(ValueError, match=message):
            get_protocol(bad)


def write_image(path: Path, width: int, height: int) -> str:
    Image.new("RGB", (width, height), (10, 20, 30)).save(path)
    return str(path)


def test_rescale_from_the_resized_frame(tmp_path):
    # 200 x 100 original, resized to 224 x 112 (grid 8 x 16 patches of 14 px): x * 200/224, y * 100/112.
    image = write_image(tmp_path / "a.png", 200, 100)
    (frame,) = image_frames(get_preset("tiny"), [[[1, 8, 16]]])[0]
    assert frame == [112, 224]
    assert rescale_box([28, 14, 112, 56], frame, image) == pytest.approx([25.0, 12.5, 100.0, 50.0])
    assert rescale_box([28, 14, 112, 56], None, image) == [28, 14, 112, 56]  # a family that does not rescale


def test_accuracy_is_strict_iou_above_half(tmp_path):
    """Ground truth [10, 10, 50, 50] (area 1600). IoU 1 -> hit; [10,10,50,30]: 800/1600 = 0.5 -> miss (strict);
    [10,10,50,31]: 840/1600 = 0.525 -> hit; a box in a half-size frame rescaled x2 onto the truth -> hit;
    no box -> [0,0,0,0] -> miss. Accuracy 3/5."""
    square = write_image(tmp_path / "square.png", 112, 112)
    wide = write_image(tmp_path / "wide.png", 224, 112)
    box = '<think>t</think><answer>{{"bbox_2d": [{}, {}, {}, {}]}}</answer>'.format
    cases = [
        (square, [1, 8, 8], box(10, 10, 50, 50), True),
        (square, [1, 8, 8], box(10, 10, 50, 30), False),
        (square, [1, 8, 8], box(10, 10, 50, 31), True),
        (wide, [1, 4, 8], box(5, 5, 25, 25), True),
        (square, [1, 8, 8], "I cannot tell.", False),
    ]
    samples = [
        Sample(
            id=i,
            problem="the thing",
            solution="<answer> [10, 10, 50, 50] </answer>",
            image_paths=(path,),
            accu_reward_method="default",
            source="t.jsonl",
            line=i + 1,
        )
        for i, (path, _, _, _) in enumerate(cases)
    ]
    frames = image_frames(get_preset("tiny"), [[g] for _, g, _, _ in cases])
    summary, records = score_rec(samples, [c for _, _, c, _ in cases], frames)
    assert [r["correct"] for r in records] == [hit for _, _, _, hit in cases]
    assert summary["accuracy"] == pytest.approx(60.0) and summary["n"] == 5
    assert records[3]["pred_box"] == pytest.approx([10.0, 10.0, 50.0, 50.0])
    # Mean of the rec_iou training reward (continuous IoU, same rescale): (1 + 0.5 + 0.525 + 1 + 0) / 5.
    assert summary["iou"] == pytest.approx(0.605)
    # The protocol IoUs Acc@0.5 thresholds (+-1 convention, here equal to the continuous ones), and their mean.
    assert [r["iou"] for r in records] == pytest.approx([1.0, 0.5, 0.525, 1.0, 0.0])
    assert summary["mean_iou"] == pytest.approx(0.605)


def test_subset_is_vlm_r1_seeded_shuffle():
    data = list(range(50))
    expected = list(range(50))
    random.seed(42)
    random.shuffle(expected)
    assert eval_subset(data, limit=20) == expected[:20]
    assert eval_subset(data, limit=None) == expected


def test_baseline_protocol_scores_float_boxes_with_the_same_rescale(tmp_path):
    """Truth [10, 10, 50, 50] on a 224 x 112 image the model saw at 112 x 56 (x2 both ways). Baseline reads
    [5.0, 5.5, 25, 24.5] -> [10, 11, 50, 49]: IoU 1520/1600 = 0.95, a hit; r1 finds no braced integer box -> miss."""
    image = write_image(tmp_path / "wide.png", 224, 112)
    sample = Sample(
        id=0,
        problem="the thing",
        solution="<answer> [10, 10, 50, 50] </answer>",
        image_paths=(image,),
        accu_reward_method="default",
        source="t.json",
        line=1,
    )
    completion = "The box is [5.0, 5.5, 25, 24.5]."
    frames = image_frames(get_preset("tiny"), [[[1, 4, 8]]])
    summary, records = score_rec([sample], [completion], frames, BASELINE)
    assert records[0]["pred_box"] == pytest.approx([10.0, 11.0, 50.0, 49.0])
    assert records[0]["iou"] == pytest.approx(0.95) and records[0]["correct"]
    assert summary["accuracy"] == 100.0
    assert score_rec([sample], [completion], frames)[0]["accuracy"] == 0.0  # r1 protocol


def test_vlm_r1_json_list_and_its_seeded_subset(tmp_path):
    """A VLM-R1 `{ds}.json` list (solution a box list) loads in file order; the subset is python's
    `random.seed(42); random.shuffle(data); data[:N]` of that list."""
    (tmp_path / "imgs").mkdir()
    items = []
    for k in range(30):
        write_image(tmp_path / "imgs" / f"{k}.png", 20 + k, 30)
        items.append({"image": f"{k}.png", "problem": f"object {k}", "solution": [1.0, 2.0, 10.0 + k, 20.0]})
    data = tmp_path / "refcoco_val.json"
    data.write_text(json.dumps(items))
    expected = list(items)
    random.seed(42)
    random.shuffle(expected)
    samples = load_eval_samples(str(data), str(tmp_path / "imgs"), limit=10)
    assert [s.problem for s in samples] == [item["problem"] for item in expected[:10]]
    assert samples[0].solution == f"<answer> {json.dumps(expected[0]['solution'])} </answer>"
    assert samples[0].image_paths == (str(tmp_path / "imgs" / expected[0]["image"]),)
    items[3]["image"] = "missing.png"
    data.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"refcoco_val.json:4: field 'image': .*not found"):
        load_eval_samples(str(data), str(tmp_path / "imgs"), limit=10)
    data.write_text(json.dumps([{"image": "0.png", "problem": "x"}]))
    with pytest.raises(ValueError, match=r"refcoco_val.json:1: field 'solution': key is missing"):
        load_eval_samples(str(data), str(tmp_path / "imgs"), limit=10)


@pytest.fixture(scope="module")
def rec_data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("rec_data")
    return generate(str(root), 8, seed=3, split="val"), image_folder(str(root))


@pytest.mark.slow
def test_eval_rec_backends_agree(fp32_release, rec_data, tmp_path, capsys):
    """Random weights: the completions are noise, but both backends must produce the same noise token for
    token (same prompts, images, left padding, M-RoPE, banned vision tokens, EOS handling)."""
    data, images = rec_data
    results = {}
    for backend in ("jax", "torch"):
        out = tmp_path / backend
        assert (
            run_cli(
                "eval",
                "rec",
                "--model",
                fp32_release,
                "--data",
                data,
                "--image-root",
                images,
                "--backend",
                backend,
                "--limit",
                7,
                "--batch-size",
                3,
                "--max-new-tokens",
                12,
                "--device",
                "cpu",
                "--out",
                out,
                "--no-progress",
            )
            == 0
        )
        assert "| val | 7 |" in capsys.readouterr().out  # the table's row
        results[backend] = json.loads((out / "rec_results_val.json").read_text())
    jax_run, torch_run = results["jax"], results["torch"]
    expected_ids = [s.id for s in load_eval_samples(data, images, limit=7)]
    assert [r["id"] for r in jax_run["results"]] == [r["id"] for r in torch_run["results"]] == expected_ids
    completions = [r["completion"] for r in jax_run["results"]]
    assert completions == [r["completion"] for r in torch_run["results"]]
    assert sum(map(len, completions)) > 20  # not vacuous: the model does emit text
    for key in ("accuracy", "iou", "format", "n"):
        assert jax_run[key] == torch_run[key], key
    assert [r["pred_box"] for r in jax_run["results"]] == [r["pred_box"] for r in torch_run["results"]]

    # --model may also be one of our checkpoints on the JAX backend (here: the release imported as one).
    from converters.import_hf import import_hf

    checkpoint = import_hf(fp32_release, tmp_path / "imported")
    assert (
        run_cli(
            "eval",
            "rec",
            "--model",
            checkpoint,
            "--data",
            data,
            "--image-root",
            images,
            "--limit",
            7,
            "--batch-size",
            3,
            "--max-new-tokens",
            12,
            "--out",
            tmp_path / "ckpt",
            "--no-progress",
        )
        == 0
    )
    capsys.readouterr()
    ckpt_run = json.loads((tmp_path / "ckpt" / "rec_results_val.json").read_text())
    assert [r["completion"] for r in ckpt_run["results"]] == completions
    assert (
        run_cli(
            "eval",
            "rec",
            "--model",
            checkpoint,
            "--data",
            data,
            "--image-root",
            images,
            "--backend",
            "torch",
            "--out",
            tmp_path / "x",
        )
        == 1
    )
    assert "needs an HF folder" in capsys.readouterr().err


def test_infer_backends_give_the_same_greedy_tokens(fp32_release, rec_data, capsys):
    from ports.torch_runtime import TorchRuntime
    from vlmr1_jax.eval.rec import GreedyDecoder
    from vlmr1_jax.processing.tokenizer import Tokenizer

    _data, images = rec_data
    image = str(sorted(Path(images).rglob("*.png"))[0])
    torch_ids = TorchRuntime.load(fp32_release, device="cpu").generate_ids([image], PROMPT, max_new_tokens=10)
    decoder = GreedyDecoder(
        load_hf_model(fp32_release),
        Tokenizer.load(fp32_release),
        task_type="{Question}",
        batch_size=1,
        max_new_tokens=10,
    )
    sample = Sample(
        id=0, problem=PROMPT, solution="", image_paths=(image,), accu_reward_method="default", source="<prompt>", line=0
    )
    assert decoder.generate([sample])[0][0] == torch_ids and len(torch_ids) > 3

    texts = []
    for backend in ("torch", "jax"):
        assert (
            run_cli(
                "infer",
                "--model",
                fp32_release,
                "--image",
                image,
                "--prompt",
                PROMPT,
                "--backend",
                backend,
                "--device",
                "cpu",
                "--max-new-tokens",
                10,
            )
            == 0
        )
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert run_cli("infer", "--model", fp32_release, "--prompt", PROMPT, "--backend", "jax", "--sample") == 1
    assert "decodes greedily" in capsys.readouterr().err


def test_greedy_decoding_sharded_over_a_mesh_gives_the_same_tokens(fp32_release, rec_data):
    """Weights sharded by their logical axes and batches split over (data, fsdp) on the 8-device mesh: the same
    greedy tokens as one device (whose tokens the test above checks against transformers)."""
    import jax

    from vlmr1_jax.config import MeshConfig
    from vlmr1_jax.data.jsonl import load_jsonl_datasets
    from vlmr1_jax.eval.rec import GreedyDecoder
    from vlmr1_jax.parallel.mesh import make_mesh
    from vlmr1_jax.processing.tokenizer import Tokenizer

    data, images = rec_data
    samples = load_jsonl_datasets([data], [images])[0][:6]  # a batch of 4, then 2 padded to 4
    tokenizer = Tokenizer.load(fp32_release)
    ids = {}
    for name, mesh in (("one", None), ("mesh", make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))):
        decoder = GreedyDecoder(
            load_hf_model(fp32_release), tokenizer, task_type="{Question}", batch_size=4, max_new_tokens=8, mesh=mesh
        )
        ids[name] = decoder.generate(samples)[0]
        if mesh is not None:  # the weights really live on the 8 devices
            assert {len(x.sharding.device_set) for x in jax.tree.leaves(decoder._state)} == {8}
    assert ids["mesh"] == ids["one"] and all(len(t) > 0 for t in ids["one"])
