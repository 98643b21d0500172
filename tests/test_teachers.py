"""Teacher features on tiny random Qwen2.5-VL and SigLIP models (offline), and through `prepare`."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unialignment_jax.data import shapes as S  # noqa: E402
from unialignment_jax.data import shapes_tasks  # noqa: E402
from unialignment_jax.data import teachers  # noqa: E402

WORDS = ["<pad>", "<unk>", "a", "an", "small", "large", "red", "green", "blue", "yellow", "magenta", "cyan",
         "circle", "square", "triangle", "at", "the", "top", "bottom", "left", "right", "center", "and", ",", "."]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


def _image_processor(name, **kw):
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kw)


def tiny_qwen():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        bos_token_id=None, eos_token_id=None, image_token_id=60, video_token_id=61, vision_start_token_id=62)
    return Qwen2_5_VLModel(cfg).eval()


def tiny_siglip():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=64),
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
    return SiglipModel(cfg).eval()


def images(n=2, res=64):
    return [S.render(shapes_tasks.make_example("t2i", "train", i).target, res) for i in range(n)]


def test_qwen_teacher_features():
    model = tiny_qwen()
    ip = _image_processor("Qwen2VLImageProcessor")
    tok = word_tokenizer()
    t = teachers.QwenVLTeacher(model, ip, tok)
    assert t.dim == 32
    imgs = images(3)
    f = t.encode_images(imgs)
    assert f.shape == (3, 32) and f.dtype == np.float16 and np.isfinite(f.astype(np.float32)).all()
    # = the mean of the vision-merger tokens of each image, computed one image at a time (officially)
    x = torch.from_numpy(imgs[1]).permute(2, 0, 1).float() / 255
    inp = ip(images=[x], return_tensors="pt", do_rescale=False)
    assert inp["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64 px -> smart resize 56 -> 4 x 4 patches
    with torch.no_grad():
        tokens = model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output[0]
    assert tokens.shape == (4, 32)  # 2 x 2 merge
    np.testing.assert_allclose(f[1].astype(np.float32), tokens.mean(0).numpy(), atol=2e-3, rtol=1e-2)
    # docs/method.md "Intrinsic alignment": a 512 px image gives 504 px, 36 x 36 patches, 324 merger tokens
    inp = ip(images=[torch.zeros(3, 512, 512)], return_tensors="pt", do_rescale=False)
    assert inp["image_grid_thw"].tolist() == [[1, 36, 36]]
    # texts: the mean of the LLM input-token embeddings of the caption's tokens
    texts = ["a large red circle at the top left.", "a small blue square"]
    g = t.encode_texts(texts)
    assert g.shape == (2, 32) and g.dtype == np.float16
    ids = tok(texts[1], add_special_tokens=False)["input_ids"]
    want = model.get_input_embeddings().weight[ids].mean(0).detach().numpy()
    np.testing.assert_allclose(g[1].astype(np.float32), want, atol=2e-3, rtol=1e-2)


def test_siglip_teacher_features():
    model = tiny_siglip()
    ip = _image_processor("SiglipImageProcessor", size={"height": 32, "width": 32})
    t = teachers.SiglipTeacher(model, ip, word_tokenizer(), text_length=16)
    assert t.dim == 24
    f = t.encode_images(images(2, res=48))
    g = t.encode_texts(["a red circle", "a large green triangle at the center"])
    assert f.shape == (2, 24) and g.shape == (2, 24)
    assert f.dtype == g.dtype == np.float16
    assert np.isfinite(f.astype(np.float32)).all() and np.isfinite(g.astype(np.float32)).all()
    assert not np.allclose(g[0], g[1])


def test_teacher_checkpoints_load_offline_and_feed_prepare(tmp_path, capsys):
    from unialignment_jax.data import prepare, prepare_args
    from unialignment_jax.data.records import open_prepared

    ckpt = str(tmp_path / "qwen")
    tiny_qwen().save_pretrained(ckpt)
    _image_processor("Qwen2VLImageProcessor").save_pretrained(ckpt)
    word_tokenizer().save_pretrained(ckpt)
    t = teachers.build_teacher("qwen", path=ckpt)
    assert isinstance(t, teachers.QwenVLTeacher) and t.dim == 32
    manifest = shapes_tasks.write_official("t2i", "train", 3, str(tmp_path / "src"), resolution=64)
    out = str(tmp_path / "ds")
    args = prepare_args.build_parser().parse_args(
        ["--manifest", manifest, "--out", out, "--task", "t2i", "--teacher", "qwen", "--teacher-path", ckpt])
    assert prepare.run(args) == 0, capsys.readouterr().err
    builder, spec = open_prepared(out)
    assert spec.teacher == "qwen" and spec.teacher_dim == 32
    rec = builder.as_data_source("train")[0]
    assert rec["teacher_image"].dtype == np.float16 and rec["teacher_image"].shape == (32,)
    caption = rec["caption"].decode()
    np.testing.assert_array_equal(rec["teacher_text"], t.encode_texts([caption])[0])
    with pytest.raises(ValueError, match="offline"):
        teachers.build_teacher("siglip", path=str(tmp_path / "missing"))


def test_shapes_teacher_through_build_teacher():
    t = teachers.build_teacher("shapes", dim=8)
    ex = shapes_tasks.make_example("caption", "train", 0)
    f = t.encode_images([S.render(ex.target, 32)])
    assert f.shape == (1, 8) and f.dtype == np.float16
    np.testing.assert_array_equal(f[0], t.scene_image_feature(ex.target))
