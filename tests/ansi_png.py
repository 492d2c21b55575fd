"""Render a `tmux capture-pane -e -p` dump (ANSI colours, half-block images) to a PNG, so that the labeler as a
user sees it in a terminal can be checked and shown in the README. Each cell becomes 8x16 pixels: half blocks
as two colour halves, other non-blank characters as a glyph drawn with PIL's default font."""
import re
import sys

from PIL import Image, ImageDraw

ANSI = re.compile(r"\x1b\[([0-9;]*)m")
BASE16 = [(0, 0, 0), (205, 49, 49), (13, 188, 121), (229, 229, 16), (36, 114, 200), (188, 63, 188), (17, 168, 205),
          (229, 229, 229), (102, 102, 102), (241, 76, 76), (35, 209, 139), (245, 245, 67), (59, 142, 234),
          (214, 112, 214), (41, 184, 219), (255, 255, 255)]


def _256(n):
    if n < 16:
        return BASE16[n]
    if n < 232:
        n -= 16
        return tuple(0 if v == 0 else 55 + 40 * v for v in (n // 36, n // 6 % 6, n % 6))
    return (8 + 10 * (n - 232),) * 3


def parse(text, default_fg=(220, 220, 220), default_bg=(20, 20, 20)):
    """-> rows of (char, fg, bg) cells."""
    rows = []
    fg, bg = default_fg, default_bg
    for line in text.split("\n"):
        cells, pos = [], 0
        for m in ANSI.finditer(line):
            cells += [(c, fg, bg) for c in line[pos:m.start()]]
            pos = m.end()
            codes = [int(c) for c in m.group(1).split(";") if c] or [0]
            i = 0
            while i < len(codes):
                c = codes[i]
                if c == 0:
                    fg, bg = default_fg, default_bg
                elif c in (38, 48) and i + 1 < len(codes):
                    if codes[i + 1] == 2:
                        col, i = tuple(codes[i + 2:i + 5]), i + 4
                    else:
                        col, i = _256(codes[i + 2]), i + 2
                    fg, bg = (col, bg) if c == 38 else (fg, col)
                elif 30 <= c <= 37:
                    fg = BASE16[c - 30]
                elif 40 <= c <= 47:
                    bg = BASE16[c - 40]
                elif 90 <= c <= 97:
                    fg = BASE16[c - 82]
                elif c == 39:
                    fg = default_fg
                elif c == 49:
                    bg = default_bg
                i += 1
        cells += [(c, fg, bg) for c in line[pos:]]
        rows.append(cells)
    return rows


def render(text, path, cw=8, ch=16):
    rows = parse(text)
    width = max((len(r) for r in rows), default=1)
    img = Image.new("RGB", (width * cw, len(rows) * ch), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    for y, row in enumerate(rows):
        for x, (c, fg, bg) in enumerate(row):
            box = (x * cw, y * ch, x * cw + cw - 1, y * ch + ch - 1)
            if c == "▀":
                draw.rectangle((box[0], box[1], box[2], box[1] + ch // 2 - 1), fill=fg)
                draw.rectangle((box[0], box[1] + ch // 2, box[2], box[3]), fill=bg)
            elif c == "▄":
                draw.rectangle((box[0], box[1], box[2], box[1] + ch // 2 - 1), fill=bg)
                draw.rectangle((box[0], box[1] + ch // 2, box[2], box[3]), fill=fg)
            else:
                draw.rectangle(box, fill=bg)
                if not c.isspace():
                    draw.text((box[0], box[1] + 2), c, fill=fg)
    img.save(path)
    return rows


if __name__ == "__main__":
    render(open(sys.argv[1]).read(), sys.argv[2])
