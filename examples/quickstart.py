"""moat's Python SDK in a minute: a sandbox, a command, a file, stateful code, a one-shot run
and a job. Needs a moat server: set MOAT_URL (http://127.0.0.1:7070) and MOAT_API_KEY (the
server's admin key is in /var/lib/moat/admin.key), then `python examples/quickstart.py`.
"""

import moat

with moat.Sandbox.create(timeout=300) as sandbox:
    r = sandbox.exec("uname -s; echo to-stderr >&2; exit 3")
    print("exec:", r.stdout.strip(), "|", r.stderr.strip(), "| exit", r.exit_code)

    sandbox.files.write("data/numbers.txt", "1\n2\n3\n")
    sandbox.run_code("total = sum(int(x) for x in open('data/numbers.txt'))")
    print("run_code:", sandbox.run_code("total * 7").text)  # the variable survived

print("one-shot:", moat.run(code="print(sum(range(10)))").stdout.strip())

client = moat.Client()
job = client.jobs.submit(code="open('out.txt', 'w').write('from a job')", outputs=["out.txt"])
job = client.jobs.wait(job.id, timeout=120)
print("job:", job.state, client.jobs.read_output(job.id, job.outputs[0].path).decode())
