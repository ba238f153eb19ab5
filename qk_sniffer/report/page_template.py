"""The Jinja2 template of ``run/run_metadata.html``: one table per split (model, dataset, sampler, data,
this run, versions; a header row where the section changes) and one table of the staged chunks.

``page.render_metadata_html`` fills it: ``splits`` is a list of ``(split, [(section, key, value), ...])``,
``columns`` the chunk table's column names and ``chunks`` one list of cell texts per chunk. Every value is
escaped by the environment (autoescape), so the template holds only markup.
"""

RUN_METADATA_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qk-sniffer run metadata</title>
<style>
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th.section { background: #eef2f6; }
td.value { font-family: ui-monospace, monospace; }
</style></head><body>
<h1>qk-sniffer: model, dataset and sampler</h1>
{% if not splits %}
<p>The final dataset has no rows yet.</p>
{% endif %}
{% for split, rows in splits %}
<h2>split <code>{{ split }}</code></h2>
<table><tbody>
{% for section, key, value in rows %}
{% if loop.changed(section) %}
<tr><th class="section" colspan="2">{{ section }}</th></tr>
{% endif %}
<tr><td>{{ key }}</td><td class="value">{{ value }}</td></tr>
{% endfor %}
</tbody></table>
{% endfor %}
{% if chunks %}
<h2>staged chunks</h2><table><thead><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for cells in chunks %}
<tr>{% for cell in cells %}<td class="value">{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody></table>
{% endif %}
</body></html>
"""
