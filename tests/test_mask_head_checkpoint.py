"""Every MODEL.MASK_ON row of the official GLIP-T key table converts and loads strictly into the
MaskHead task head built with the official default of four hourglass blocks."""

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from glipv2_d2 import add_glipv2_config
from glipv2_d2.checkpoint import GLIPv2Checkpointer, convert_official_state_dict, official_to_model_key

from .test_checkpoint import REPO, released_checkpoint_rows, synthetic_official_state_dict


def test_official_mask_rows_load_strictly_with_the_default_four_blocks(single_thread, tmp_path):
    cfg = add_glipv2_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "glipv2_T.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.GLIPV2.TASK_HEADS = ["MaskHead"]
    assert list(cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS) == [256, 256, 256, 256]
    model = build_model(cfg)

    mask_rows = released_checkpoint_rows(("MODEL.MASK_ON",))
    assert len(mask_rows) == 4 * 24 + 6
    assert all(official_to_model_key(key).startswith("task_heads.MaskHead.") for key, _, _ in mask_rows)
    rows = released_checkpoint_rows(("base", "MODEL.MASK_ON"))
    official = {k: v for k, v in synthetic_official_state_dict(rows).items() if "cell_anchors" not in k}
    convert_official_state_dict(official, model.state_dict())  # raises on any unmatched key or shape
    head_keys = {k for k in model.state_dict() if k.startswith("task_heads.MaskHead.")}
    assert head_keys == {official_to_model_key(key) for key, _, _ in mask_rows}
    path = tmp_path / "glip_tiny_with_mask_head.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()}}, path)
    for p in model.parameters():
        p.data.zero_()
    GLIPv2Checkpointer(model, strict=True).load(str(path))
    row_of = {key: index + 1 for index, (key, _, _) in enumerate(rows)}
    params = dict(model.named_parameters())
    for key, _, _ in mask_rows:
        assert torch.all(params[official_to_model_key(key)] == row_of[key]), key
