// client.images.generate({...IMAGEGEN_PARAMS, stream: true}): prints every event, in order.
import { makeClient, params, run } from "./common.mjs";

run(async () => {
  const client = makeClient();
  const stream = await client.images.generate({ ...params(), stream: true });
  const events = [];
  for await (const event of stream) {
    events.push(event);
  }
  return { events };
});
