"""E2B's DataFrame and chart examples, unmodified, on moat's data-science interpreter: the
`code-interpreter-v1` template rebuilt by scripts/interpreter-template.sh (numpy, pandas and
matplotlib, with moat's own build). `crates/moat/tests/interpreter_template.rs` builds it
before it runs this file."""

import base64

import pytest
from e2b_code_interpreter import Sandbox
from e2b_code_interpreter.charts import BarChart, LineChart


@pytest.fixture(scope="module")
def sbx(moat):
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


def test_a_dataframe_comes_back_as_html_and_text(sbx):
    execution = sbx.run_code(
        "import pandas as pd\n"
        "df = pd.DataFrame({'name': ['a', 'b'], 'value': [1, 2]})\n"
        "df"
    )
    assert execution.error is None, execution.error
    result = execution.results[0]
    assert "<table" in result.html and "value" in result.html, result.html
    assert "name" in result.text, result.text


def test_a_matplotlib_figure_comes_back_as_png(sbx):
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [4, 1, 9])\n"
        "plt.title('values')\n"
        "plt.show()"
    )
    assert execution.error is None, execution.error
    pngs = [r.png for r in execution.results if r.png]
    assert pngs, execution.results
    assert base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    # The figure's data, as E2B extracts it.
    chart = next(r.chart for r in execution.results if r.png)
    assert isinstance(chart, LineChart), chart
    assert chart.title == "values"
    assert [(x, y) for x, y in chart.elements[0].points] == [(1, 4), (2, 1), (3, 9)]


def test_a_bar_chart_carries_its_bars(sbx):
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.bar(['apples', 'pears'], [3, 5], label='fruit')\n"
        "ax.set_xlabel('kind')\n"
        "ax.set_ylabel('count')\n"
        "plt.show()"
    )
    assert execution.error is None, execution.error
    chart = next(r.chart for r in execution.results if r.png)
    assert isinstance(chart, BarChart), chart
    assert (chart.x_label, chart.y_label) == ("kind", "count")
    assert [(b.label, b.value, b.group) for b in chart.elements] == [
        ("apples", 3, "fruit"),
        ("pears", 5, "fruit"),
    ]


def test_numpy_computes(sbx):
    execution = sbx.run_code("import numpy as np\nint(np.arange(6).reshape(2, 3).sum())")
    assert execution.text == "15", execution
