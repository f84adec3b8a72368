// moat's code-interpreter driver for JavaScript (and TypeScript where node can strip types).
//
// The agent starts it as `node -e <this text> -- <command fd> <event fd> <entry limit> <language>`.
// It reads one JSON command per line from the command pipe ({"code": str, "env": {str: str}}),
// runs the code as a script in this process's global context (so declarations persist), and
// writes JSON frames, one per line, to the event pipe: {"type": "ready"} once, then per command
// any number of "result" frames, at most one "error" frame and always one "done" frame. The
// code's console output goes to the process's stdout and stderr, which the agent reads apart from
// the frames.
'use strict';
(() => {
  const fs = require('fs');
  const net = require('net');
  const util = require('util');
  const vm = require('vm');

  const [cmdArg, eventArg, limitArg, language] = process.argv.slice(1);
  const entryLimit = Number(limitArg);

  // Reopened through /proc so the descriptors are close-on-exec: child processes of the code must
  // not inherit the private pipes. Without /proc the inherited numbers are used as they are.
  const reopen = (fd, flags) => {
    try {
      const fresh = fs.openSync(`/proc/self/fd/${fd}`, flags);
      fs.closeSync(fd);
      return fresh;
    } catch (_) {
      return fd;
    }
  };
  const cmdFd = reopen(Number(cmdArg), 'r');
  const eventFd = reopen(Number(eventArg), 'w');

  let stripTypes = null;
  if (language === 'typescript') {
    try {
      const mod = require('module');
      if (typeof mod.stripTypeScriptTypes === 'function') {
        stripTypes = (code) => mod.stripTypeScriptTypes(code, { mode: 'strip' });
      }
    } catch (_) {
      stripTypes = null;
    }
  }

  const send = (frame) => {
    const data = Buffer.from(JSON.stringify(frame) + '\n', 'utf8');
    let off = 0;
    while (off < data.length) {
      try {
        off += fs.writeSync(eventFd, data, off);
      } catch (e) {
        if (e.code !== 'EAGAIN') throw e;
      }
    }
  };

  const text = (value) => {
    let out;
    try {
      out = util.inspect(value);
    } catch (e) {
      out = `<inspect failed: ${e}>`;
    }
    if (Buffer.byteLength(out, 'utf8') > entryLimit) {
      out = out.slice(0, Math.floor(entryLimit / 4)) + '\u2026 [truncated]';
    }
    return out;
  };

  // Stack lines of the driver and of node's internals say nothing about the code.
  const cleanStack = (stack) =>
    stack
      .split('\n')
      .filter((line) => !/^\s+at\s.*(\[eval\]|node:)/.test(line))
      .join('\n');

  const errorFrame = (e) => {
    const isError = e instanceof Error || (e && typeof e === 'object' && 'stack' in e);
    const name = isError && e.name ? String(e.name) : 'Error';
    const value = isError ? String(e.message) : text(e);
    const traceback = isError && e.stack ? cleanStack(String(e.stack)) : `Uncaught ${value}`;
    return { type: 'error', name, value, traceback };
  };

  // Interrupts: while a script runs synchronously `breakOnSigint` turns SIGINT into an error;
  // while the execution waits for a promise this handler ends the wait. Between executions
  // SIGINT is ignored instead of killing the driver.
  let interruptWait = null;
  process.on('SIGINT', () => {
    if (interruptWait) interruptWait();
  });
  // An error thrown later by a timer or callback of the code must not end the context.
  process.on('uncaughtException', (e) => {
    process.stderr.write(`Uncaught ${e && e.stack ? e.stack : e}\n`);
  });
  process.on('unhandledRejection', (e) => {
    process.stderr.write(`Unhandled rejection: ${e && e.stack ? e.stack : e}\n`);
  });

  let count = 0;
  const execute = async (command) => {
    count += 1;
    const env = command.env || {};
    const saved = {};
    for (const [k, v] of Object.entries(env)) {
      saved[k] = Object.prototype.hasOwnProperty.call(process.env, k) ? process.env[k] : undefined;
      process.env[k] = v;
    }
    try {
      let code = command.code || '';
      if (stripTypes) code = stripTypes(code);
      const script = new vm.Script(code, { filename: `<cell ${count}>` });
      let value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
      if (value && typeof value.then === 'function') {
        const interrupted = new Promise((_, reject) => {
          interruptWait = () => reject(new Error('Script execution was interrupted by `SIGINT`'));
        });
        value = await Promise.race([value, interrupted]);
      }
      if (value !== undefined) {
        send({ type: 'result', is_main_result: true, text: text(value) });
      }
    } catch (e) {
      send(errorFrame(e));
    } finally {
      interruptWait = null;
      for (const [k, old] of Object.entries(saved)) {
        if (old === undefined) delete process.env[k];
        else process.env[k] = old;
      }
      send({ type: 'done' });
    }
  };

  // Commands arrive one at a time (the agent waits for "done"); the chain keeps them in order.
  let chain = Promise.resolve();
  let pending = '';
  const input = new net.Socket({ fd: cmdFd, readable: true, writable: false });
  input.setEncoding('utf8');
  input.on('data', (chunk) => {
    pending += chunk;
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      let command;
      try {
        command = JSON.parse(line);
      } catch (_) {
        continue;
      }
      chain = chain.then(() => execute(command));
    }
  });
  input.on('end', () => process.exit(0));
  send({ type: 'ready' });
})();
