"""Times the query benchmark's six questions through cloudtap's HTTP endpoint and
through DuckDB's Python API on the same Parquet files, in the same run, and prints
each figure beside the other with the ratio. Called by scripts/bench-query.sh.

Each query runs once to warm caches, then `--runs` times; the median counts. Both
engines answer the same question on the same files; where their SQL dialects differ
the text differs, and the row counts of the answers are checked to agree.
"""
import argparse
import json
import math
import statistics
import time
import urllib.request

import duckdb


def queries(session):
    # (name, cloudtap SQL, DuckDB SQL)
    return [
        ("count by target",
         "SELECT target, count(*) AS n FROM requests GROUP BY target ORDER BY target",
         None),
        ("p99 latency by path",
         "SELECT path, percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99 "
         "FROM http_exchanges GROUP BY path ORDER BY path",
         "SELECT path, quantile_cont(duration_ms, 0.99) AS p99 "
         "FROM http_exchanges GROUP BY path ORDER BY path"),
        ("top talkers",
         "SELECT identity, sum(bytes_up + bytes_down) AS bytes FROM sessions "
         "GROUP BY identity ORDER BY bytes DESC LIMIT 10",
         None),
        ("one session's frames by id",
         f"SELECT seq, direction, byte_offset, length FROM frames "
         f"WHERE session_id = '{session}' ORDER BY seq",
         None),
        ("text search in payloads",
         "SELECT count(*) AS n FROM frames WHERE payload_text(payload) LIKE '%needle%'",
         "SELECT count(*) AS n FROM frames WHERE CAST(payload AS VARCHAR) LIKE '%needle%'"),
        ("exchanges joined to policy events",
         "SELECT x.path, count(*) AS n FROM requests x JOIN events e "
         "ON e.identity = x.identity AND e.target = x.target "
         "WHERE e.kind = 'policy_decision' AND NOT e.allowed "
         "GROUP BY x.path ORDER BY n DESC, x.path LIMIT 10",
         None),
    ]


def cloudtap(url, token, sql):
    req = urllib.request.Request(
        url + "/v1/query",
        data=json.dumps({"sql": sql}).encode(),
        headers={"authorization": "Bearer " + token,
                 "content-type": "application/json",
                 "accept": "application/json"},
        method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        body = json.loads(r.read())
    return len(body["rows"]), body


def duck(con, sql):
    return len(con.sql(sql).fetchall()), None


def timed(fn, runs):
    fn()
    times = []
    out = None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--session", required=True)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()

    con = duckdb.connect()
    for t in ["sessions", "streams", "events", "frames", "http_exchanges"]:
        con.sql(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{a.archive}/{t}/**/*.parquet', "
                f"hive_partitioning = true, hive_types = {{'date': VARCHAR, 'hour': VARCHAR}})")
    con.sql("CREATE VIEW requests AS SELECT x.*, s.identity, s.target, s.edge "
            "FROM http_exchanges x JOIN sessions s ON x.session_id = s.session_id")

    print(f"{'query':<36} {'cloudtap (HTTP)':>16} {'DuckDB (Python)':>16} {'ratio':>7}  rows")
    ratios = []
    for name, ours, theirs in queries(a.session):
        t_ours, (n_ours, _) = timed(lambda: cloudtap(a.http, a.token, ours), a.runs)
        t_duck, (n_duck, _) = timed(lambda: duck(con, theirs or ours), a.runs)
        ratio = t_ours / t_duck
        ratios.append(ratio)
        agree = "" if n_ours == n_duck else f"  (DuckDB: {n_duck} rows: answers differ!)"
        print(f"{name:<36} {t_ours * 1000:>13.1f} ms {t_duck * 1000:>13.1f} ms {ratio:>6.2f}x  {n_ours}{agree}")
    gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"{'geometric mean of the ratios':<36} {'':>16} {'':>16} {gm:>6.2f}x  (target <= 1.2x)")

    sql = (f"EXPLAIN ANALYZE SELECT seq, direction, byte_offset, length FROM frames "
           f"WHERE session_id = '{a.session}' ORDER BY seq")
    _, body = cloudtap(a.http, a.token, sql)
    print("\nEXPLAIN ANALYZE of the session lookup, the Parquet scan's pruning metrics:")
    for row in body["rows"]:
        plan = row.get("plan", "")
        for line in plan.splitlines():
            if "DataSourceExec" in line:
                metrics = line[line.find("metrics=["):]
                keep = [m.strip() for m in metrics.strip("metrics=[]").split(", ")
                        if any(k in m for k in ("files_ranges_pruned", "row_groups_pruned",
                                                "page_index_rows_pruned", "bytes_scanned",
                                                "output_rows", "pushdown_rows"))]
                print("  " + "\n  ".join(keep))


if __name__ == "__main__":
    main()
