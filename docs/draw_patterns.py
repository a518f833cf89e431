"""Draws docs/patterns.png: the token masks of the patterns, as in the paper's figure 3.

    python docs/draw_patterns.py
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tf_sparse_attn.layouts import BlockLayout, mask_picture, write_png  # noqa: E402

SEQ_LEN, BLOCK, STRIDE = 64, 4, 8


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "patterns.png")):
    panels = [
        BlockLayout.dense(SEQ_LEN, BLOCK),
        BlockLayout.local(SEQ_LEN, BLOCK, STRIDE),
        BlockLayout.strided(SEQ_LEN, BLOCK, STRIDE),
        BlockLayout.fixed(SEQ_LEN, BLOCK, 2 * STRIDE, BLOCK),
        BlockLayout.fixed(SEQ_LEN, BLOCK, 2 * STRIDE, BLOCK, num_heads=2,
                          num_summary_groups=2),
    ]
    pictures = [mask_picture(layout, head=1 if i == 4 else 0, cell=4)
                for i, layout in enumerate(panels)]
    gap = np.full((pictures[0].shape[0], 12, 3), 255, np.uint8)
    row = np.concatenate([p for pair in zip(pictures, [gap] * len(pictures)) for p in pair][:-1],
                         axis=1)
    write_png(path, row)
    print(f"wrote {path}: " + ", ".join(l.description for l in panels))


if __name__ == "__main__":
    main()
