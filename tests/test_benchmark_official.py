"""tools/official_glip_shim.py's stand-in for maskrcnn_benchmark._C, without the official checkout:
argument order of the compiled signatures, equality with torchvision / plain convolution, the legacy
"+1" NMS rule, and the offline BERT patch restoring transformers afterwards."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d, sigmoid_focal_loss

from tools import official_glip_shim as shim
from tools.benchmark_official import compare_detections


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_modulated_deform_conv_forward_follows_the_compiled_argument_order():
    x, weight, bias = _rand(2, 4, 7, 9, seed=1), _rand(6, 2, 3, 3, seed=2), _rand(6, seed=3)
    offset, mask = _rand(2, 2 * 2 * 9, 4, 5, seed=4), torch.sigmoid(_rand(2, 2 * 9, 4, 5, seed=5))
    output = x.new_empty(0)
    # input, weight, bias, ones, offset, mask, output, columns, kernel_h, kernel_w, stride_h, stride_w,
    # pad_h, pad_w, dilation_h, dilation_w, group, deformable_group, with_bias
    shim.modulated_deform_conv_forward(x, weight, bias, x.new_empty(0), offset, mask, output, x.new_empty(0),
                                       3, 3, 2, 2, 1, 1, 1, 1, 2, 2, True)
    expected = deform_conv2d(x, offset, weight, bias, stride=2, padding=1, mask=mask)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    # The Function replacement: ModulatedDeformConvFunction.apply's order, without bias too.
    got = shim.modulated_deform_conv(x, offset, mask, weight, None, 2, 1, 1, 2, 2)
    torch.testing.assert_close(got, deform_conv2d(x, offset, weight, None, stride=2, padding=1, mask=mask))


def test_zero_offsets_and_unit_mask_give_the_plain_convolution_with_h_and_w_kept_apart():
    # A 3x1 kernel, stride (2, 1), padding (1, 0): swapping any h/w pair changes the output shape or values.
    x, weight, bias = _rand(1, 3, 8, 6, seed=6), _rand(5, 3, 3, 1, seed=7), _rand(5, seed=8)
    expected = F.conv2d(x, weight, bias, stride=(2, 1), padding=(1, 0))
    out_h, out_w = expected.shape[-2:]
    output = x.new_empty(0)
    shim.modulated_deform_conv_forward(x, weight, bias, x.new_empty(0), torch.zeros(1, 6, out_h, out_w),
                                       torch.ones(1, 3, out_h, out_w), output, x.new_empty(0),
                                       3, 1, 2, 1, 1, 0, 1, 1, 1, 1, True)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    # DCNv1 takes every pair width first: kW, kH, dW, dH, padW, padH, dilationW, dilationH.
    output = x.new_empty(0)
    shim.deform_conv_forward(x, weight, torch.zeros(1, 6, out_h, out_w), output, x.new_empty(0), x.new_empty(0),
                             1, 3, 1, 2, 0, 1, 1, 1, 1, 1, 64)
    torch.testing.assert_close(output, F.conv2d(x, weight, None, stride=(2, 1), padding=(1, 0)), rtol=1e-5, atol=1e-5)
    got = shim.deform_conv(x, torch.zeros(1, 6, out_h, out_w), weight, (2, 1), (1, 0))
    torch.testing.assert_close(got, output)


def test_offsets_larger_than_the_output_are_read_flat_per_image_like_the_cuda_kernel():
    # DyConv hands a finer level's offsets (5x6) to the conv producing the coarser level (3x3).
    x, weight = _rand(2, 4, 3, 3, seed=9), _rand(4, 4, 3, 3, seed=10)
    offset, mask = _rand(2, 18, 5, 6, seed=11), torch.sigmoid(_rand(2, 9, 5, 6, seed=12))
    got = shim.modulated_deform_conv(x, offset, mask, weight, None, 1, 1)
    flat_offset = offset.reshape(2, -1)[:, :18 * 9].reshape(2, 18, 3, 3)
    flat_mask = mask.reshape(2, -1)[:, :9 * 9].reshape(2, 9, 3, 3)
    torch.testing.assert_close(got, deform_conv2d(x, flat_offset, weight, padding=1, mask=flat_mask))
    with pytest.raises(ValueError, match="smaller than the conv output"):
        shim.modulated_deform_conv(x, offset[..., :2, :2], mask[..., :2, :2], weight, None, 1, 1)


def _legacy_nms(boxes, scores, labels, threshold):
    """maskrcnn_benchmark's CUDA rule, written out: +1 areas, suppress same-label boxes at IoU > threshold."""
    order, suppressed, keep = scores.argsort(descending=True).tolist(), set(), []
    for n, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[n + 1:]:
            if labels[j] != labels[i]:
                continue
            w = max(0.0, float(min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]) + 1))
            h = max(0.0, float(min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]) + 1))
            area = [float((b[2] - b[0] + 1) * (b[3] - b[1] + 1)) for b in (boxes[i], boxes[j])]
            if w * h / (area[0] + area[1] - w * h) > threshold:
                suppressed.add(j)
    return keep


def test_nms_uses_the_legacy_plus_one_areas():
    # IoU 90/110 = 0.818 with +1 areas, 72/90 = 0.8 without: at 0.81 only the legacy rule suppresses.
    boxes, scores = torch.tensor([[0.0, 0, 9, 9], [1, 0, 10, 9]]), torch.tensor([0.9, 0.8])
    assert shim.nms(boxes, scores, 0.81).tolist() == [0]
    assert shim.nms(boxes, scores, 0.82).tolist() == [0, 1]
    assert shim.nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_nms_and_ml_nms_equal_the_legacy_rule_on_random_boxes():
    xy = torch.rand(60, 2, generator=torch.Generator().manual_seed(13)) * 40
    wh = torch.rand(60, 2, generator=torch.Generator().manual_seed(14)) * 30 + 2
    boxes, scores = torch.cat([xy, xy + wh], 1), torch.rand(60, generator=torch.Generator().manual_seed(15))
    labels = torch.randint(1, 4, (60,), generator=torch.Generator().manual_seed(16))
    assert shim.nms(boxes, scores, 0.5).tolist() == _legacy_nms(boxes, scores, torch.zeros(60), 0.5)
    # ml_nms takes the labels as floats, as the official boxlist_ml_nms passes them.
    assert shim.ml_nms(boxes, scores, labels.float(), 0.6).tolist() == _legacy_nms(boxes, scores, labels, 0.6)


def test_sigmoid_focal_loss_and_the_c_module():
    logits, labels = _rand(5, 4, seed=17), torch.tensor([0, 1, 4, 2, 0])  # labels 1..C, 0 background
    one_hot = F.one_hot(labels, 5)[:, 1:].float()
    expected = sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(shim.sigmoid_focalloss_forward(logits, labels, 4, 2.0, 0.25), expected)
    module = shim.make_c_module()
    assert module.ml_nms is shim.ml_nms and module.modulated_deform_conv_forward is shim.modulated_deform_conv_forward
    with pytest.raises(NotImplementedError, match="inference only"):
        module.modulated_deform_conv_backward()


def test_offline_bert_resolves_only_the_official_name_and_restores_transformers():
    from transformers import AutoTokenizer, BertConfig, BertModel

    before = {owner: owner.__dict__.get("from_pretrained") for owner in (BertConfig, BertModel, AutoTokenizer)}

    class FakeTokenizer:
        def __call__(self, texts, **kwargs):
            return (texts, kwargs)

    with shim.offline_bert(lambda name: FakeTokenizer()):
        config = BertConfig.from_pretrained("bert-base-uncased")
        assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 30522)
        tiny = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
        model = BertModel.from_pretrained("bert-base-uncased", add_pooling_layer=False, config=tiny)
        assert isinstance(model, BertModel) and model.pooler is None
        tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")
        assert tokenizer.batch_encode_plus(["a. b"], max_length=4) == (["a. b"], {"max_length": 4})
    assert {owner: owner.__dict__.get("from_pretrained") for owner in before} == before


def test_compare_detections_matches_by_class_and_iou():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 30, 30]])
    official = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7]), "classes": torch.tensor([0, 1, 2])}
    project = {"boxes": boxes[[2, 0, 1]] + torch.tensor([0.0, 0, 0, 0.01]),
               "scores": torch.tensor([0.7, 0.9, 0.8]), "classes": torch.tensor([2, 0, 3])}
    report = compare_detections(official, project)
    assert (report["official_detections"], report["project_detections"], report["matched"]) == (3, 3, 2)
    assert report["max_score_diff"] == pytest.approx(0.0, abs=1e-6)
    assert report["max_box_diff_px"] == pytest.approx(0.01, abs=1e-5)
