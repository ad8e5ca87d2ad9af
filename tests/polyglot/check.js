// A Node caller: loads the proto at run time with @grpc/proto-loader, queries, then watches to completion.
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
      console.log('node client ok:', answer.request_id);
      client.close();
    });
  });
