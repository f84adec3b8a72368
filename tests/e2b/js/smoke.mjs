// The e2b JavaScript SDK against moat serve: create, run a command, write and read a file,
// list, kill. Needs E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY (crates/moat/tests/e2b_sdk.rs).
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

const sbx = await Sandbox.create({ metadata: { suite: 'js-smoke' } })
try {
  const r = await sbx.commands.run('echo hi from node')
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'hi from node\n')

  await sbx.files.write('/home/user/js.txt', 'written by node')
  assert.equal(await sbx.files.read('/home/user/js.txt'), 'written by node')

  const failed = await sbx.commands.run('exit 4').catch((e) => e)
  assert.equal(failed.exitCode, 4)

  const listed = await Sandbox.list({ query: { metadata: { suite: 'js-smoke' } } }).nextItems()
  assert.ok(listed.some((s) => s.sandboxId === sbx.sandboxId))
  assert.equal(await sbx.isRunning(), true)
} finally {
  await sbx.kill()
}
assert.equal(await sbx.isRunning(), false)
console.log('js smoke: ok')
