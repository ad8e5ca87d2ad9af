// A Node caller: loads the proto at run time with @grpc/proto-loader, queries, then watches to completion; then
// checks a recipient in one call (live, then cached, then live again after an invalidation) and bad input.
// Usage: node check.js PROTO_ROOT ADDRESS
'use strict';
const assert = require('node:assert');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [protoRoot, address] = process.argv.slice(2);
const definition = loader.loadSync('capability/v1/capability_service.proto', {
  includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).capability.v1;
const client = new v1.CapabilityService(address, grpc.credentials.createInsecure());

const identities = [
  { channel: 'CHANNEL_WHATSAPP', identity: '46712312312' },
  { channel: 'CHANNEL_RCS', identity: '46700000004' },
];
client.QueryCapability({ app_id: 'node-app', recipient: { identified_by: { channel_identities: identities } } },
  (err, answer) => {
    assert.ifError(err);
    assert.strictEqual(answer.request_id.length, 26);
    const seen = [];
    let completion = null;
    const call = client.WatchCapability({ request_id: answer.request_id, wait: { seconds: 10 } });
    call.on('data', (message) => {
      if (message.event === 'notification') {
        const n = message.notification;
        seen.push(`${n.offset}:${n.channel}:${n.capability_status}`);
      } else if (message.event === 'completion') {
        completion = message.completion;
      }
    });
    call.on('status', (status) => {
      assert.strictEqual(status.code, grpc.status.OK, status.details);
      seen.sort();
      assert.deepStrictEqual(seen.map((s) => s.slice(2)).sort(),
        ['CHANNEL_RCS:CAPABILITY_STATUS_PARTIAL', 'CHANNEL_WHATSAPP:CAPABILITY_STATUS_FULL']);
      assert.strictEqual(completion.reason, 'COMPLETION_REASON_ALL_CHANNELS_REPORTED');
      assert.strictEqual(completion.last_offset, '2');
      checkCapability().then(() => {
        console.log('node client ok:', answer.request_id);
        client.close();
      }, (err) => {
        client.close();
        console.error(err);
        process.exitCode = 1;
      });
    });
  });

// A unary call as a promise, with a deadline.
function call(method, request, seconds = 15) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + seconds * 1000 },
      (err, answer) => (err ? reject(err) : resolve(answer)));
  });
}

// CheckCapability as a new user would call it, against the sandbox: an identity's last digit decides its status
// (0-3 full, 4-5 partial, 6-8 no capability). Identities of their own: the cache is the process's. The server's
// default channel preference (RCS, WHATSAPP, …, VIBERBM, …, SMS) orders each group of the recommendation.
async function checkCapability() {
  const expected = [ // channel, identity, status, in request order
    ['CHANNEL_RCS', '46722220005', 'CAPABILITY_STATUS_PARTIAL'],
    ['CHANNEL_VIBERBM', '46722220007', 'CAPABILITY_STATUS_NO_CAPABILITY'],
    ['CHANNEL_SMS', '46722220002', 'CAPABILITY_STATUS_FULL'],
    ['CHANNEL_WHATSAPP', '46722220003', 'CAPABILITY_STATUS_FULL'],
  ];
  const recipient = {
    identified_by: { channel_identities: expected.map(([channel, identity]) => ({ channel, identity })) },
  };
  // Every FULL before every PARTIAL (RCS, first preferred, is only partial); never NO_CAPABILITY.
  const recommended = [
    ['CHANNEL_WHATSAPP', '46722220003'], ['CHANNEL_SMS', '46722220002'], ['CHANNEL_RCS', '46722220005'],
  ];
  const request = { app_id: 'node-app', recipient, wait: { seconds: 5 } };

  const check = async (source) => {
    const answer = await call('CheckCapability', request);
    assert.strictEqual(answer.complete, true, JSON.stringify(answer));
    assert.deepStrictEqual(answer.pending, []);
    assert.deepStrictEqual(
      answer.results.map((r) => [r.notification.channel, r.notification.identity, r.notification.capability_status]),
      expected);
    for (const r of answer.results) {
      assert.strictEqual(r.source, source, JSON.stringify(r));
      assert.ok(Number(r.checked_at.seconds) > 0, JSON.stringify(r));
      assert.ok(r.notification.request_id, JSON.stringify(r));
      if (r.notification.capability_status === 'CAPABILITY_STATUS_PARTIAL') {
        assert.deepStrictEqual(r.notification.channel_capabilities, ['TEXT', 'MEDIA']);
      }
    }
    assert.deepStrictEqual(answer.recommended.map((i) => [i.channel, i.identity]), recommended);
    return answer;
  };

  const live = await check('RESULT_SOURCE_LIVE');
  assert.ok(live.request_id, 'a live check names its query');
  assert.deepStrictEqual([...new Set(live.results.map((r) => r.notification.request_id))], [live.request_id]);

  const cached = await check('RESULT_SOURCE_CACHE');
  assert.strictEqual(cached.request_id, '');
  assert.deepStrictEqual([...new Set(cached.results.map((r) => r.notification.request_id))], [live.request_id]);

  const invalidated = await call('InvalidateCapability', { app_id: 'node-app', recipient });
  assert.strictEqual(invalidated.removed, String(expected.length));
  const again = await check('RESULT_SOURCE_LIVE');
  assert.ok(again.request_id && again.request_id !== live.request_id, again.request_id);

  const invalid = async (method, bad, field) => {
    await assert.rejects(call(method, bad), (err) => {
      assert.strictEqual(err.code, grpc.status.INVALID_ARGUMENT, err.details);
      assert.ok(err.details.includes(field), err.details);
      return true;
    });
  };
  await invalid('CheckCapability', { app_id: 'node-app', recipient, max_age: { seconds: -1 } }, 'max_age');
  await invalid('InvalidateCapability', { app_id: 'node-app' }, 'recipient');
}
