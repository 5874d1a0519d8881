"""Top SASS instructions by warp-stall samples from `ncu --page source --print-source sass --csv`.
    python benchmarks/profile/ncu_top_sass.py REPORT.csv [N]"""
import csv
import sys


def main(path, n=40):
    with open(path, newline="") as fh:
        lines = fh.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(('"#"', '"Address"'))
                 or "Source" in line and "Warp Stall Sampling" in line)
    rows = list(csv.DictReader(lines[start:]))
    key = next(k for k in rows[0] if k.startswith("Warp Stall Sampling (All"))
    total = sum(float(r[key] or 0) for r in rows)
    rows.sort(key=lambda r: -float(r[key] or 0))
    print(f"{len(rows)} SASS lines, {total:.0f} stall samples")
    for r in rows[:n]:
        print(f"{float(r[key] or 0) / total:6.1%}  {r.get('Address', '')}  {r.get('Source', '')[:110]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
