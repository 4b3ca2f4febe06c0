"""Rebuild examples/data/vader_movie_reviews.tsv from the vaderSentiment 3.3.2 source archive.

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    python examples/make_vader_subset.py /tmp/vader/vaderSentiment-3.3.2.tar.gz

Keeps movie-review sentences of 4-32 words and draws a fixed-seed sample stratified over the rating
range, so preference pairs with clear rating gaps exist in every split.
"""
import io
import random
import sys
import tarfile

MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def main(sdist: str, out: str = "examples/data/vader_movie_reviews.tsv", per_bin: int = 300) -> None:
    with tarfile.open(sdist) as outer:
        inner_file = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=io.BytesIO(outer.extractfile(inner_file).read()))
        text = inner.extractfile(MEMBER).read().decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        sid, rating, sentence = parts[0], float(parts[1]), " ".join(parts[2].split())
        if 4 <= len(sentence.split()) <= 32:
            rows.append((sid, rating, sentence))
    bins: dict[int, list] = {}
    for r in rows:
        bins.setdefault(min(7, int(r[1] + 4)), []).append(r)
    rng = random.Random(0)
    keep = []
    for b in sorted(bins):
        rng.shuffle(bins[b])
        keep += bins[b][:per_bin]
    keep.sort(key=lambda r: int(r[0]))
    with open(out, "w") as f:
        f.write("id\tmean_rating\tsentence\n")
        for sid, rating, sentence in keep:
            f.write(f"{sid}\t{rating:.4f}\t{sentence}\n")
    print(f"wrote {len(keep)} of {len(rows)} sentences to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
