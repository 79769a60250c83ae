"""The report page: one self-contained jinja2 template (autoescaped)."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, select_autoescape

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>
 body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
 h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
 .meta { color: #666; }
 table { border-collapse: collapse; width: 100%; font-size: 13px; }
 th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
 th { background: #eef2f7; } td.l, th.l { text-align: left; }
 tr:nth-child(even) td { background: #fafafa; }
 .bad { color: #b00020; font-weight: bold; }
 figure { margin: 18px 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
 figcaption { color: #555; font-size: 12px; }
</style></head>
<body>
<h1>{{ title }}</h1>
<p class="meta">Generated {{ generated }} by edge {{ version }} from {{ n_bench }} bench,
{{ n_latency }} latency and {{ n_fairness }} fairness record(s).</p>

{% if bench_rows %}
<h2>Benchmarks (latest test per model, quant, threads)</h2>
<table id="bench">
<tr><th class="l">when (UTC)</th><th class="l">model</th><th class="l">quant</th><th>threads</th>
<th class="l">test</th><th>pp t/s</th><th>tg t/s</th><th>TTFT ms</th><th>peak RSS MiB</th>
<th>temp °C</th><th>throttled</th><th class="l">device</th></tr>
{% for r in bench_rows %}
<tr><td class="l">{{ r.when }}</td><td class="l">{{ r.model }}</td><td class="l">{{ r.quant }}</td>
<td>{{ r.threads }}</td><td class="l">{{ r.test }}</td><td>{{ r.pp }}</td><td>{{ r.tg }}</td>
<td>{{ r.ttft }}</td><td>{{ r.rss }}</td><td>{{ r.temp }}</td>
<td{% if r.throttled == "THROTTLED" %} class="bad"{% endif %}>{{ r.throttled }}</td>
<td class="l">{{ r.board }}</td></tr>
{% endfor %}
</table>
{% endif %}

{% if latency_rows %}
<h2>Latency logs (edge run / chat; medians)</h2>
<table id="latency">
<tr><th class="l">command</th><th class="l">model</th><th>runs</th><th>gen t/s</th>
<th>prompt t/s</th><th>TTFT ms</th><th class="l">last (UTC)</th></tr>
{% for r in latency_rows %}
<tr><td class="l">{{ r.command }}</td><td class="l">{{ r.model }}</td><td>{{ r.n }}</td>
<td>{{ r.gen_tps }}</td><td>{{ r.prompt_tps }}</td><td>{{ r.ttft }}</td><td class="l">{{ r.last }}</td></tr>
{% endfor %}
</table>
{% endif %}

{% if audit_rows %}
<h2>Bias audits (latest first; 95% bootstrap CIs; unbiased: pct 50, mean 0, ss 50, s_amb 0)</h2>
<table id="audits">
<tr><th class="l">when (UTC)</th><th class="l">model</th><th class="l">suite</th><th class="l">correction</th>
<th>items</th><th class="l">bias figure</th><th class="l">beside it</th></tr>
{% for r in audit_rows %}
<tr><td class="l">{{ r.when }}</td><td class="l">{{ r.model }}</td><td class="l">{{ r.suite }}</td>
<td class="l">{{ r.correction }}</td><td>{{ r.n }}</td><td class="l">{{ r.figures[0] }}</td>
<td class="l">{{ r.figures[1] if r.figures|length > 1 else "" }}</td></tr>
{% endfor %}
</table>
{% endif %}

{% if fix_rows %}
<h2>Bias corrections (edge bias mitigate, judged on held-out rows; latest first)</h2>
<table id="corrections">
<tr><th class="l">when (UTC)</th><th class="l">model</th><th class="l">method</th><th>splits</th>
<th>held-out pct before</th><th>after</th><th>PPL rise</th><th>CI holds 50</th><th>change significant</th>
<th>BBQ drop ≤ 1 pt</th></tr>
{% for r in fix_rows %}
<tr><td class="l">{{ r.when }}</td><td class="l">{{ r.model }}</td><td class="l">{{ r.method }}</td>
<td>{{ r.splits }}</td><td>{{ r.before }}</td><td>{{ r.after }}</td><td>{{ r.ppl }}</td><td>{{ r.holds50 }}</td>
<td>{{ r.significant }}</td><td>{{ r.bbq }}</td></tr>
{% endfor %}
</table>
<p class="meta">With several splits: median (min to max) over the splits; the checks count the splits that pass.</p>
{% endif %}

<h2>Plots</h2>
{% for img in images %}
<figure><img src="{{ img.file }}" alt="{{ img.caption }}"><figcaption>{{ img.caption }}</figcaption></figure>
{% endfor %}
<script>
 // Lets a headless browser check that every plot decoded (see tests/test_report.py).
 window.addEventListener("load", function () {
   var imgs = document.images, ok = 0;
   for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
   document.body.setAttribute("data-images-ok", ok + "/" + imgs.length);
 });
</script>
</body></html>
"""

_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_template = _env.from_string(PAGE)


def render(**context: Any) -> str:
    return _template.render(**context)
