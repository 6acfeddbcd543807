// client.images.generate({...IMAGEGEN_PARAMS, stream: true}): prints every event, in order, and
// what the SDK threw while iterating (an error event midway), if anything.
import { describeError, makeClient, params, run } from "./common.mjs";

run(async () => {
  const client = makeClient();
  const stream = await client.images.generate({ ...params(), stream: true });
  const events = [];
  let error = null;
  try {
    for await (const event of stream) {
      events.push(event);
    }
  } catch (err) {
    error = describeError(err);
  }
  return { events, error };
});
