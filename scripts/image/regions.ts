/**
 * How a generated memory image maps onto guest RAM: one region, `ram0`, at image offset 0 with
 * 4 KiB pages. The source describes it in WELCOME (RegionInfo); the VMM hands it over in the
 * handoff with its host address (HandoffRegion).
 */
import type { HandoffRegion } from '../../protocol/handoff.js';
import type { RegionInfo } from '../../protocol/wire.js';
import { IMAGE_PAGE_SIZE_BYTES } from './gen-image.js';

export const SINGLE_REGION_NAME = 'ram0';

/** The image's layout as the source describes it. */
export function singleRegion(sizeBytes: number): RegionInfo[] {
  return [{ name: SINGLE_REGION_NAME, offset: 0, sizeBytes, pageSizeBytes: IMAGE_PAGE_SIZE_BYTES }];
}

/** The same region as a VMM hands it over: `base` is the host address of guest RAM. */
export function singleHandoffRegion(base: number, sizeBytes: number): HandoffRegion[] {
  return [
    {
      name: SINGLE_REGION_NAME,
      base,
      sizeBytes,
      offset: 0,
      pageSizeBytes: IMAGE_PAGE_SIZE_BYTES,
    },
  ];
}
