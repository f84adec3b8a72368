// File writes through the e2b JavaScript SDK that the agent refuses or must help with: a write
// whose parents the user could not create, and a refused multipart upload of 100 files, whose
// error must reach the SDK rather than a broken connection ("fetch failed").
// Needs E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY (crates/moat/tests/e2b_sdk.rs).
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

const sbx = await Sandbox.create({ metadata: { suite: 'js-file-errors' } })
try {
  // Missing parents under a directory the user cannot write: made, and given to the user.
  await sbx.files.write('/0/a/b.txt', 'made')
  assert.equal(await sbx.files.read('/0/a/b.txt'), 'made')
  const owners = await sbx.commands.run('stat -c %U /0 /0/a /0/a/b.txt')
  assert.equal(owners.stdout, 'user\nuser\nuser\n')

  // 100 files in one request whose first destination is a directory: the agent's 400 arrives
  // while the rest of the upload is still on its way.
  const files = [{ path: '/home/user', data: 'x' }]
  for (let i = 1; i < 100; i++) {
    files.push({ path: `/home/user/many/${i}.txt`, data: 'y'.repeat(64 * 1024) })
  }
  const err = await sbx.files.write(files).then(
    () => assert.fail('writing over a directory succeeded'),
    (e) => e,
  )
  assert.match(String(err.message), /is a directory/, String(err))
} finally {
  await sbx.kill()
}
console.log('js file errors: ok')
