#!/usr/bin/env python
"""Write the VQA answer vocabulary (MODEL.VQA.ANSWER_VOCAB_FILE) from training questions.

The answers are normalised as the official evaluation does, counted once per question (its most
common annotator answer), and the most frequent kept, ties in alphabetical order. VQAv2's standard
3,129 answers (BUTD, VinVL, the paper's vocabulary size) are those of at least 9 train + val questions:
  python tools/build_vqa_vocab.py --dataset glipv2_vqav2_train glipv2_vqav2_val \
      --min-count 9 --output datasets/vqav2/answer_vocab.json
Datasets are the registered names (datasets/README.md); MODEL.VQA.NUM_ANSWERS must equal the
number of answers written, which the tool prints.
"""

import argparse
import sys

from detectron2.data import DatasetCatalog

from glipv2_d2.data.datasets import register_all_glipv2_datasets
from glipv2_d2.data.vqa_answers import build_answer_vocabulary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", required=True, help="registered VQA datasets to count answers of")
    parser.add_argument("--output", required=True, help="the vocabulary file to write (a JSON list of answers)")
    parser.add_argument("--max-answers", type=int, default=3129, help="keep at most this many answers")
    parser.add_argument("--min-count", type=int, default=1, help="keep answers of at least this many questions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register_all_glipv2_datasets()
    missing = [name for name in args.dataset if name not in DatasetCatalog.list()]
    if missing:
        print(f"error: datasets {missing} are not registered (see datasets/README.md)", file=sys.stderr)
        return 1
    records = [record for name in args.dataset for record in DatasetCatalog.get(name)]
    unanswered = [r.get("question_id") for r in records if not r.get("answers")]
    if unanswered:
        print(f"error: {len(unanswered)} questions have no answers (e.g. question {unanswered[0]}); "
              "count a split with annotations", file=sys.stderr)
        return 1
    vocabulary = build_answer_vocabulary(records, args.max_answers, args.min_count)
    vocabulary.save(args.output)
    print(f"{len(vocabulary)} answers of {len(records)} questions -> {args.output} "
          f"(set MODEL.VQA.NUM_ANSWERS {len(vocabulary)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
